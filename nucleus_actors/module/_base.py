"""`Module`: the base class of every plug-in module."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..record import Hash, Record

if TYPE_CHECKING:
    from ._context import ModuleContext

__all__ = ["Module"]


class Module:
    """Base class of ledger modules: override the callbacks you need.

    Every callback of one module runs inside that module's actor task, one message at a time:
    two callbacks of the same module never run concurrently, so a module needs no locks for its
    own state. Each callback (except `stop`, which `shutdown` bounds) is bounded by the module's
    `timeout`; exceeding it is a crash.

    Set `id` as a class attribute or in `__init__`; it must be unique within a ledger and match
    `[A-Za-z0-9][A-Za-z0-9_.-]*` (at most 128 characters).
    """

    id: str
    """Unique id within the ledger (class attribute or set in `__init__`)."""
    version: str = "0.0.0"
    """Version of the module, shown in statuses."""

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Check this module's settings (`ModuleSpec.config`) without building or starting it.

        Optional: override it as a `@staticmethod` that raises `ValueError` naming the bad
        setting and its value. `nucleus check` and `nucleus run` call it for every module of a
        configuration before anything starts (a failure is a configuration error, exit 2);
        call it from `init` too so the Python API checks the same. The default accepts
        everything.
        """

    @classmethod
    def overrides(cls, callback: str) -> bool:
        """Whether this class overrides the `Module` callback named `callback`.

        The runtime runs `before_append` and `after_append` only for classes that override
        them (a module without a `before_append` never holds appends), and instruments see
        only the callbacks the runtime runs. This is the one place that rule is written.
        """
        return getattr(cls, callback) is not getattr(Module, callback)

    async def init(self, ctx: ModuleContext) -> None:
        """Prepare resources. Runs in registration/dependency order during `init_all`.

        Raising fails `init_all` (startup rolls back); during a restart it is a new crash.
        Cancellation: the module is being stopped or killed; clean up and let it propagate.
        """

    async def start(self, ctx: ModuleContext) -> None:
        """Begin work (spawn background tasks with `ctx.spawn`). Runs after every `init`."""

    async def stop(self, ctx: ModuleContext) -> None:
        """Release resources. Runs in reverse start order, bounded by the `shutdown` deadline.

        Called after the inbox drained (on `stop_all`/`terminate`), before a restart (best
        effort, after a crash) and after `ctx.exit()`. Background tasks are still running while
        `stop` runs and are cancelled after it returns. If `stop` overstays `shutdown`, the
        actor is cancelled (the status records it).
        """

    async def before_append(self, record: Record) -> Record | None:
        """Inspect or transform a record before it is stored.

        Return `None` to keep the record, or a new `Record` (e.g. `record.with_meta(...)`) to
        replace it; the next module sees your output. Raise `RecordRejected("reason")` to veto
        the append; any other exception is a crash of this module and fails that append.
        Do not mutate the record's payload in place: records are values.
        """
        return None

    async def after_append(self, record: Record, hash: Hash) -> None:
        """React to a committed record (with `seq` and `timestamp` set) and its chain hash.

        Called for every committed entry in commit order: exactly once while nothing crashes,
        at least once across a restart of this module (the delivery it crashed on is
        redelivered to the new incarnation first).
        """

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        """Durable modules only (optional): the last seq whose effect this module has durably
        recorded itself, or `None` for nothing yet (then `ModuleSpec.start_at` applies).

        Define it when the module keeps its own effects and its position in one transaction
        of its own store: the runtime then stores no cursor for it and delivers from the
        returned seq + 1 (effectively exactly once). It runs in every incarnation after `init`,
        before `start`, bounded by the module's `timeout`; raising, or returning a seq beyond
        the ledger's head, is a crash. Defining it on a non-durable module is a
        `RegistryError` at register.
        Cancellation: the module is being stopped or killed; let it propagate.
        """
        return None
