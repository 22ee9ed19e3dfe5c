"""The read-only side of a ledger's modules: status types, handles and registry queries.

`engine.modules` and `ctx.modules` are a `ModuleRegistry`: a view with no mutating methods over
the supervisor (`_supervisor.py`), which owns every module's state. Changes go through the
engine (`register`, `init_all`, ..., `add`, `terminate`, `restart`, `remove`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, TypeVarTuple, Unpack, final, overload

import trio

from ._construct import NoPublicConstructor
from .errors import ModuleError, RegistryError
from .lifecycle import ModuleState, StopResult
from .module._base import Module
from .module._mailbox import Ask

if TYPE_CHECKING:
    from ._supervisor import Supervisor
    from .module._actor import Child

__all__ = [
    "ModuleCounts",
    "ModuleHandle",
    "ModuleRegistry",
    "ModuleStatus",
    "Statistics",
]

M = TypeVar("M", bound=Module)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_MODULE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleStatus:
    """Snapshot of one module."""

    id: str
    """Module id."""
    version: str
    """Module version (of the current instance)."""
    state: ModuleState
    """Lifecycle state."""
    restarts: int
    """Times it was restarted (group and manual restarts included)."""
    crashes: int
    """Times it crashed (including failed restarts)."""
    last_error: str | None
    """The last crash or stop error, as `repr`, or None."""
    inbox_depth: int
    """after_append deliveries queued or being processed."""
    processed: int
    """after_append deliveries processed."""
    dropped: int
    """after_append deliveries dropped by its overflow policy."""
    stop_result: StopResult | None
    """How it last stopped (`StopResult`; compares equal to its string value), or None if it
    never stopped."""
    incarnation: int
    """1 for the first run, +1 per restart."""
    cursor: int | None = None
    """Highest seq processed (a durable module: its position, from which it resumes); None:
    nothing yet."""
    lag: int = 0
    """Committed entries not yet processed by it: head seq - cursor for a durable module,
    the deliveries still in its inbox for another."""
    stalls: int = 0
    """Times one of its callbacks blocked the event loop longer than
    `LedgerConfig.stall_warning` (counted by the stall watchdog; fix: `isolation=PROCESS`)."""
    pid: int | None = None
    """Process id of its worker while an isolated module (`Isolation.PROCESS`) runs; None
    for a task module or between incarnations."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleCounts:
    """How many modules are in each group of states."""

    specs: int
    """Registered modules."""
    running: int
    """RUNNING."""
    restarting: int
    """RESTARTING."""
    stopped: int
    """STOPPED (or not started yet: REGISTERED, INITIALIZED, STOPPING)."""
    failed: int
    """FAILED."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Statistics:
    """Counters of one ledger since it was opened."""

    appends: int
    """Committed records."""
    rejects: int
    """Records vetoed by a before_append (RecordRejected)."""
    crashes: int
    """Module crashes (a failed restart counts as one)."""
    restarts: int
    """Module restarts: every restart of every module, group and manual ones included."""


@final
class ModuleHandle(Generic[M], metaclass=NoPublicConstructor):
    """A typed handle on one registered module: identity, state, status, and `ask`.

    Handles come from `engine.register`, `engine.add` and `engine.modules.get`; they have no
    public constructor.
    """

    __slots__ = ("_child",)

    def __init__(self, child: Child) -> None:
        self._child = child

    def __repr__(self) -> str:
        return f"<ModuleHandle {self.id!r} {self.state.name}>"

    @property
    def id(self) -> str:
        """Module id."""
        return self._child.id

    @property
    def version(self) -> str:
        """Version of the current instance."""
        return self._child.version

    @property
    def state(self) -> ModuleState:
        """Current lifecycle state."""
        return self._child.state

    @property
    def status(self) -> ModuleStatus:
        """Snapshot of the module's state and counters."""
        return _status(self._child)

    async def wait_state(self, state: ModuleState, *more: ModuleState) -> ModuleState:
        """Wait until the module is in one of the given states; return that state.

        Returns at once (after a checkpoint) if it already is. Cancellation: just stops waiting.
        """
        wanted = {state, *more}
        child = self._child
        if child.state in wanted:
            await trio.lowlevel.checkpoint()
            return child.state
        value: ModuleState = await child.state_value.wait_value(lambda s: s in wanted)
        return value

    @overload
    async def ask(self, fn: Callable[[M, Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T: ...

    @overload
    async def ask(self, fn: Callable[[M, Unpack[Ts]], T], *args: *Ts) -> T: ...

    async def ask(self, fn: Callable[..., Any], *args: Any) -> Any:  # type: ignore[misc]
        """Run `fn(module, *args)` (sync or async) inside the module's actor; return its result.

        The call is queued behind every message already in the inbox (so it sees every
        after_append delivered before it was sent) and runs serialised with the hooks, bounded
        by the module's `timeout`. An exception from `fn` is raised here and is not a crash.
        An ask sent while the module restarts runs in the new incarnation.

        Cancellation: if the ask has not started it is skipped; if it is running it finishes
        and its result is discarded.

        Raises:
            ModuleError: the module is FAILED, STOPPED or removed, or crashed or timed out
                while answering (then `__cause__` is the crash, `TimeoutError` for a timeout).
        """
        child = self._child
        if child.mailbox.is_shut or child.removed:
            raise ModuleError(
                f"cannot ask module {child.id!r}: it is {child.state.name}"
                + (" (removed)" if child.removed else "")
                + "; ask needs a module that is not stopped or failed",
                module_id=child.id,
            )
        msg = Ask(fn, args, child.host.ledger_reader.state.length)
        child.mailbox.put(msg)
        return await msg.reply.wait()


def _handle(child: Child) -> ModuleHandle[Any]:
    """The runtime's way to make a handle (the class has no public constructor)."""
    handle: ModuleHandle[Any] = ModuleHandle._create(child)
    return handle


def _status(child: Child) -> ModuleStatus:
    return ModuleStatus(
        id=child.id,
        version=child.version,
        state=child.state,
        restarts=child.restarts,
        crashes=child.crashes,
        last_error=child.last_error,
        inbox_depth=child.mailbox.depth,
        processed=child.processed,
        dropped=child.mailbox.dropped,
        stop_result=child.stop_result,
        incarnation=child.incarnation,
        cursor=child.cursor,
        lag=child.lag,
        stalls=child.stalls,
        pid=None if child.worker is None or not child.worker.usable else child.worker.pid,
    )


def check_module_id(module_id: object) -> str:
    """Validate a module id. Raises RegistryError naming the rule and the value."""
    if (
        not isinstance(module_id, str)
        or not module_id
        or len(module_id) > 128
        or not set(module_id) <= _MODULE_ID_CHARS
        or not module_id[0].isalnum()
    ):
        raise RegistryError(
            "module id must be 1..128 letters, digits, '_', '.', '-' starting with a letter "
            f"or digit, got {module_id!r}",
            module_id=module_id if isinstance(module_id, str) else None,
        )
    return module_id


@final
class ModuleRegistry(metaclass=NoPublicConstructor):
    """The modules of one ledger, in start order: a read-only view (`engine.modules`,
    `ctx.modules`).

    It has no mutating methods: changes go through the engine (`register`, `init_all`, ...,
    `add`, `terminate`, `restart`, `remove`). No public constructor.
    """

    __slots__ = ("_supervisor",)

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    # -- read-only API ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._supervisor.order)

    def __contains__(self, module_id: object) -> bool:
        return module_id in self._supervisor.children

    def __iter__(self) -> Iterator[ModuleHandle[Module]]:
        """Handles in start order (registration order before `init_all`)."""
        return (_handle(child) for child in list(self._supervisor.order))

    @overload
    def get(self, key: type[M]) -> ModuleHandle[M]: ...

    @overload
    def get(self, key: str) -> ModuleHandle[Module]: ...

    def get(self, key: type[M] | str) -> ModuleHandle[M] | ModuleHandle[Module]:
        """The handle of a module, by id or by class (matched with `isinstance`).

        Raises:
            RegistryError: no such module, or several modules are instances of that class.
        """
        if isinstance(key, str):
            child = self._supervisor.children.get(key)
            if child is None:
                raise RegistryError(
                    f"no module with id {key!r} (registered: {sorted(self._supervisor.children)})",
                    module_id=key,
                )
            return _handle(child)
        if not (isinstance(key, type) and issubclass(key, Module)):
            raise RegistryError(f"get() takes a module id or a Module subclass, got {key!r}")
        matches = [c for c in self._supervisor.order if isinstance(c.instance, key)]
        if not matches:
            raise RegistryError(f"no module is an instance of {key.__qualname__}")
        if len(matches) > 1:
            raise RegistryError(
                f"{len(matches)} modules are instances of {key.__qualname__} "
                f"({[c.id for c in matches]}); get one by id"
            )
        return _handle(matches[0])

    def status(self) -> list[ModuleStatus]:
        """Snapshots of every module, in start order."""
        return [_status(child) for child in self._supervisor.order]

    def counts(self) -> ModuleCounts:
        """How many modules are running, restarting, stopped, failed."""
        states = [child.state for child in self._supervisor.order]
        return ModuleCounts(
            specs=len(states),
            running=states.count(ModuleState.RUNNING),
            restarting=states.count(ModuleState.RESTARTING),
            failed=states.count(ModuleState.FAILED),
            stopped=sum(
                s
                in (
                    ModuleState.STOPPED,
                    ModuleState.REGISTERED,
                    ModuleState.INITIALIZED,
                    ModuleState.STOPPING,
                )
                for s in states
            ),
        )
