"""`ModuleContext`: what a module gets in its callbacks."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..errors import ModuleError
from ..record import Entry, Hash

if TYPE_CHECKING:
    from ..lifecycle import LedgerState
    from ..proofs import ConsistencyProof, InclusionProof
    from ..registry import ModuleRegistry

__all__ = ["LedgerReader", "ModuleContext"]


class LedgerReader(Protocol):
    """Read-only view of the ledger a module runs in (`ctx.ledger`)."""

    @property
    def state(self) -> LedgerState:
        """Snapshot: phase, length and head hash."""
        ...

    async def get(self, seq: int) -> Entry:
        """The entry at `seq` (IndexError if absent)."""
        ...

    def read(self, start: int = 0, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries `start <= seq < stop` (None: to the head)."""
        ...

    async def verify(self) -> Hash:
        """Recompute the whole chain from storage (IntegrityError naming the first bad seq)."""
        ...

    async def root(self, size: int | None = None) -> Hash:
        """Merkle root of the first `size` entries (None: all committed)."""
        ...

    async def inclusion_proof(self, seq: int, size: int | None = None) -> InclusionProof:
        """Proof that entry `seq` is in the tree of `size` entries (None: all committed)."""
        ...

    async def consistency_proof(
        self, old_size: int, new_size: int | None = None
    ) -> ConsistencyProof:
        """Proof that the tree of `old_size` entries is a prefix of the `new_size` one."""
        ...


def _unobserved(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    return fn


class ModuleContext:
    """Handed to every lifecycle callback: identity, config, logger, views, spawn and exit.

    One context per incarnation: after a restart the module gets a new one.
    """

    __slots__ = (
        "_exit",
        "_nursery",
        "_observe",
        "config",
        "incarnation",
        "ledger",
        "ledger_id",
        "log",
        "module_id",
        "modules",
    )

    def __init__(
        self,
        *,
        ledger_id: str,
        module_id: str,
        config: Mapping[str, Any],
        ledger: LedgerReader,
        modules: ModuleRegistry,
        incarnation: int,
        exit: Callable[[], None],
    ) -> None:
        self.ledger_id = ledger_id
        """Id of the ledger the module runs in."""
        self.module_id = module_id
        """This module's id."""
        self.config = config
        """The `config` mapping given at register (read-only)."""
        self.log = logging.getLogger(f"nucleus_actors.module.{module_id}")
        """Logger named `nucleus_actors.module.<id>`."""
        self.ledger = ledger
        """Read-only view of the ledger: `state`, `get`, `read`, `verify`, `root`,
        `inclusion_proof`, `consistency_proof`."""
        self.modules = modules
        """The registry (read-only use: `get`, `status`, `counts`; `ask` other modules)."""
        self.incarnation = incarnation
        """1 for the first run of the module, +1 on every restart."""
        self._nursery: trio.Nursery | None = None
        self._exit = exit
        # The actor's instrumentation of background work (the "background" callback).
        self._observe: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]
        self._observe = _unobserved

    def spawn(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        name: str | None = None,
        exit_on_return: bool = True,
    ) -> None:
        """Run `fn(*args)` as background work of this module, in its own nursery.

        An exception from it is a crash of the module. It is cancelled when the module stops
        (after `stop` returned) or crashes. By default the work is meant to keep running: when
        it returns, the module exits normally, as if it called `ctx.exit()` (pass
        `exit_on_return=False` for a helper that may finish on its own).

        Raises:
            ModuleError: this incarnation of the module has ended.
        """
        nursery = self._nursery
        if nursery is None:
            raise ModuleError(
                f"cannot spawn: incarnation {self.incarnation} of module {self.module_id!r} "
                "has ended",
                module_id=self.module_id,
            )

        work = self._observe(fn)

        async def background() -> None:
            await work(*args)
            if exit_on_return:
                self._exit()

        nursery.start_soon(background, name=name or getattr(fn, "__qualname__", repr(fn)))

    def exit(self) -> None:
        """End the module normally: its actor is cancelled, `stop` runs, then it is STOPPED.

        PERMANENT modules are restarted after an exit (as in OTP); TRANSIENT and TEMPORARY are
        not. Returns at once; the calling callback is cancelled at its next checkpoint.
        """
        self._exit()
