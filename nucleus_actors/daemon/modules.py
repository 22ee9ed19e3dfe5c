"""Two small modules a daemon configuration can name (`nucleus init` uses both).

* `RequireFields` — a validator: records of the chosen kinds must carry some payload fields.
* `KindCounter` — an index: counts committed records per kind, exactly once across restarts.

They use nothing but the public module API, so they double as examples for module authors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import RecordRejected
from ..module import Module, ModuleContext
from ..record import Hash, Record

__all__ = ["KindCounter", "RequireFields"]


def _strings(config: Mapping[str, Any], key: str, *, required: bool) -> tuple[str, ...]:
    value = config.get(key)
    if value is None and not required:
        return ()
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or not value
        or not all(isinstance(item, str) and item for item in value)
    ):
        raise ValueError(
            f"config {key!r} must be a non-empty list of non-empty strings, got {value!r}"
        )
    return tuple(value)


class RequireFields(Module):
    """Reject records whose payload lacks required top-level fields.

    Config:
        fields: the payload keys every checked record must have (required, a list of str).
        kinds: kind prefixes to check (`["order."]` checks `order.created`, ...); unset checks
            every record.

    A checked record whose payload is not an object, or misses a field, is rejected (409 over
    HTTP) with a reason naming the missing fields. Bad config fails `init`, so the ledger does
    not start.
    """

    id = "require-fields"
    version = "1.0.0"

    def __init__(self) -> None:
        self.fields: tuple[str, ...] = ()
        self.kinds: tuple[str, ...] = ()

    async def init(self, ctx: ModuleContext) -> None:
        """Read and check `fields` and `kinds` from the config.

        Raises:
            ValueError: `fields` is missing or not a list of strings, or `kinds` is malformed.
        """
        self.fields = _strings(ctx.config, "fields", required=True)
        self.kinds = _strings(ctx.config, "kinds", required=False)

    async def before_append(self, record: Record) -> Record | None:
        """Veto a checked record that misses a required field; pass the others unchanged.

        Raises:
            RecordRejected: naming the kind and the missing fields.
        """
        if self.kinds and not record.kind.startswith(self.kinds):
            return None
        payload = record.payload
        if not isinstance(payload, Mapping):
            names = ", ".join(repr(name) for name in self.fields)
            raise RecordRejected(
                f"record of kind {record.kind!r} needs an object payload with {names}"
            )
        missing = [repr(name) for name in self.fields if name not in payload]
        if missing:
            raise RecordRejected(
                f"record of kind {record.kind!r} is missing {', '.join(missing)} in its payload"
            )
        return None


class KindCounter(Module):
    """Count committed records per kind, exactly once even across restarts.

    On `init` it rebuilds its counts by reading the ledger (so a restart or a daemon restart
    loses nothing), then counts each new entry once: a delivery redelivered after a crash is
    recognised by its seq. Ask it: `await handle.ask(lambda m: dict(m.counts))`. On `stop` it
    logs the totals.

    The rebuild reads the whole ledger within the module's `timeout`: for very large ledgers,
    raise the timeout or keep counts elsewhere.
    """

    id = "kind-counter"
    version = "1.0.0"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        """Committed records per kind."""
        self.next_seq = 0
        """The first seq not counted yet."""

    async def init(self, ctx: ModuleContext) -> None:
        """Rebuild the counts from the entries already in the ledger."""
        self.counts = {}
        end = ctx.ledger.state.length
        async for entry in ctx.ledger.read(0, end):
            self._count(entry.record.kind)
        self.next_seq = end

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1

    async def after_append(self, record: Record, hash: Hash) -> None:
        """Count the record unless its seq was counted already (a redelivery)."""
        assert record.seq is not None
        if record.seq < self.next_seq:
            return
        self._count(record.kind)
        self.next_seq = record.seq + 1

    async def stop(self, ctx: ModuleContext) -> None:
        """Log the totals."""
        total = sum(self.counts.values())
        ctx.log.info("%d records counted by kind: %s", total, self.counts)
