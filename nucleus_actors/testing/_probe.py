"""`Probe`: a module that records every callback it receives, for assertions."""

from __future__ import annotations

from collections.abc import Callable

from nucleus_actors import Hash, Module, ModuleContext, Record

from ._events import Callback, CallbackEvent, CallbackLog, CallOutcome

__all__ = ["GatingProbe", "Probe"]


class Probe(Module):
    """Records each init/start/stop/after_append it gets as a `CallbackEvent` in `log`.

    It has no `before_append`, so appends never wait for it (use `GatingProbe` for that).
    Every event carries the incarnation (from `ctx.incarnation`), the seq and the hash of
    after_append deliveries, so a test can check at-least-once, in-order delivery:

    ```python
    probe = Probe()
    async with open_ledger(config, modules=[probe]) as engine:
        ...
    assert probe.seen == list(range(engine.state.length))
    ```

    Args:
        id: module id ["probe"].
        log: where to record (share one between the instances a factory makes); a new
            `CallbackLog` by default.
    """

    def __init__(self, id: str = "probe", *, log: CallbackLog | None = None) -> None:
        self.id = id
        self.log = CallbackLog() if log is None else log
        """The events recorded so far (shared with other probes if given at construction)."""
        hooks = {Callback.AFTER_APPEND}
        if type(self).before_append is not Module.before_append:
            hooks.add(Callback.BEFORE_APPEND)
        self.log.note_hooks(id, frozenset(hooks))
        self.incarnation = 0
        """The current incarnation (0 before the first `init`)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {len(self.log)} events>"

    @classmethod
    def factory(cls, id: str = "probe") -> Callable[[], Probe]:
        """A zero-argument factory (a fresh probe per restart) whose probes share one log.

        The log is the factory's `log` attribute.
        """
        log = CallbackLog()

        def make() -> Probe:
            return cls(id, log=log)

        make.log = log  # type: ignore[attr-defined]
        return make

    @property
    def seen(self) -> list[int]:
        """Seqs of the after_append deliveries received, in order (redeliveries included)."""
        return self.log.seen(self.id)

    def _record(
        self, callback: Callback, record: Record | None = None, hash: Hash | None = None
    ) -> None:
        call = self.log.next_call(self.id, callback)
        self.log.add(
            CallbackEvent(
                module_id=self.id,
                incarnation=self.incarnation,
                callback=callback,
                call=call,
                record=record,
                seq=record.seq if callback is Callback.AFTER_APPEND and record else None,
                hash=hash,
                outcome=CallOutcome.RETURNED,
                handled=True,
            )
        )

    async def init(self, ctx: ModuleContext) -> None:
        """Record the call (and the new incarnation)."""
        self.incarnation = ctx.incarnation
        self._record(Callback.INIT)

    async def start(self, ctx: ModuleContext) -> None:
        """Record the call."""
        self._record(Callback.START)

    async def stop(self, ctx: ModuleContext) -> None:
        """Record the call."""
        self._record(Callback.STOP)

    async def after_append(self, record: Record, hash: Hash) -> None:
        """Record the delivery: seq, hash and incarnation."""
        self._record(Callback.AFTER_APPEND, record, hash)


class GatingProbe(Probe):
    """A `Probe` that also has a `before_append` (it records each record and keeps it).

    Because its class overrides `before_append`, appends are fail-closed on it, like on any
    validator: while it restarts appends wait, while it is FAILED they fail.
    """

    async def before_append(self, record: Record) -> Record | None:
        """Record the call; keep the record unchanged."""
        self._record(Callback.BEFORE_APPEND, record)
        return None
