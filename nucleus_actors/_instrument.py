"""The instrumentation seam: observers called around every callback of a module.

In the style of `trio.abc.Instrument`: an `Instrument` overrides the hooks it wants;
`before_callback` and `after_callback` are plain (synchronous) calls made by the module's
actor around each `init`, `start`, `stop`, `resume_after` (durable modules that own their
position), `before_append`, `after_append` and each task started with `ctx.spawn`
("background"). Instruments observe (metrics, tracing) and may inject
(fault plans): `before_callback` may return an `Injection`, whose coroutines the actor awaits
right before or right after the module's own callback, inside that callback's deadline.

Instruments come from two places: `engine.add_instrument(instrument)` (every module of that
ledger) and `attach_instrument(module, instrument)` (one module instance, wherever it is
registered; what `FaultPlan.wrap` and the daemon's hook metrics use). The runtime calls them
only for callbacks it runs: a hook a module's class does not override is never called, so
never observed (`Module.overrides`).

Built so that it also works for a module in another process later: the hooks take plain
values (`CallbackCall`, `CallbackResult`), so a worker can report the same events and the
parent calls the observers.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import RecordRejected
from .record import Hash, Record

if TYPE_CHECKING:
    from .module._base import Module

__all__ = [
    "CallbackCall",
    "CallbackOutcome",
    "CallbackResult",
    "Injection",
    "Instrument",
    "attach_instrument",
    "attached_instruments",
    "detach_instrument",
]

T = TypeVar("T")


class CallbackOutcome(StrEnum):
    """How one callback call ended."""

    RETURNED = "returned"
    """It returned normally."""
    REJECTED = "rejected"
    """`before_append` raised `RecordRejected` (a veto, not a crash)."""
    RAISED = "raised"
    """It raised an exception: a crash of the module (or, for `stop`, a stop error)."""
    CANCELLED = "cancelled"
    """It was cancelled: its timeout or shutdown deadline expired, or the module was killed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackCall:
    """One callback the runtime is about to run (what `before_callback` gets)."""

    module_id: str
    """Id of the module."""
    callback: str
    """"init", "start", "stop", "resume_after", "before_append", "after_append" or
    "background"."""
    incarnation: int
    """Incarnation of the module (1 for its first run, +1 per restart)."""
    record: Record | None = None
    """before_append: the record as received; after_append: the committed record."""
    hash: Hash | None = None
    """after_append: the entry's chain hash."""
    pid: int | None = None
    """The worker process running the callback when the module is isolated
    (`Isolation.PROCESS`), else None. For a batch of records sent to a worker in one message,
    `before_callback` is called for each record before the batch is sent (an injection makes
    its record go alone), `after_callback` when the batch's results are back."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackResult:
    """How a callback call ended (what `after_callback` gets)."""

    outcome: CallbackOutcome
    """Returned, rejected, raised or cancelled."""
    duration: float
    """Seconds (`time.perf_counter`) from just before the call to its end, injections
    included; for "background", from when the task began."""
    error: BaseException | None
    """The exception it raised (None when it returned)."""
    completed: bool
    """Whether the module's own callback ran to its end (returned, or vetoed the record):
    False when an injection stopped the call before the module's code ran or finished."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Injection:
    """What an instrument adds to one call (returned by `before_callback`)."""

    entry: Callable[[], Awaitable[None]] | None = None
    """Awaited before the module's callback (raise to crash or veto, sleep to slow it)."""
    exit: Callable[[], Awaitable[None]] | None = None
    """Awaited after the module's callback returned (the module did see the call)."""


class Instrument:
    """Base class of callback observers: override the hooks you need (both default to no-op).

    Hooks run in the module's actor task, synchronously: keep them fast, and do not raise
    (an exception from a hook is a crash of the module, as if its callback raised).
    """

    def before_callback(self, call: CallbackCall) -> Injection | None:
        """Called right before a callback runs; may return an `Injection`."""
        return None

    def after_callback(self, call: CallbackCall, result: CallbackResult) -> None:
        """Called when the callback ended, however it ended (also when cancelled)."""


# module instance -> its instruments. Keyed by id() because modules need not be hashable; a
# weakref callback forgets a collected instance (modules without __weakref__ are kept).
_ATTACHED: dict[int, tuple[Any, list[Instrument]]] = {}


def attach_instrument(module: Module, instrument: Instrument) -> None:
    """Observe (and possibly inject into) every callback of this module instance.

    Attaching the same instrument twice is a no-op. The last one attached acts first (its
    injection's `entry` runs outermost).

    Raises:
        TypeError: `instrument` is not an `Instrument`.
    """
    if not isinstance(instrument, Instrument):
        raise TypeError(f"attach_instrument takes an Instrument, got {type(instrument).__name__}")
    key = id(module)
    entry = _ATTACHED.get(key)
    if entry is None or entry[0]() is not module:
        try:
            ref: Any = weakref.ref(module, lambda _: _ATTACHED.pop(key, None))
        except TypeError:  # no __weakref__ slot: keep it alive with its instruments
            ref = _Strong(module)
        entry = _ATTACHED[key] = (ref, [])
    if instrument not in entry[1]:
        entry[1].append(instrument)


def detach_instrument(module: Module, instrument: Instrument) -> None:
    """Stop observing this module instance with `instrument` (no-op if not attached)."""
    entry = _ATTACHED.get(id(module))
    if entry is not None and entry[0]() is module and instrument in entry[1]:
        entry[1].remove(instrument)


def attached_instruments(module: Module) -> tuple[Instrument, ...]:
    """The instruments attached to this module instance, in the order they were attached."""
    entry = _ATTACHED.get(id(module))
    if entry is None or entry[0]() is not module:
        return ()
    return tuple(entry[1])


class _Strong:
    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __call__(self) -> object:
        return self.value


def begin(instruments: Sequence[Instrument], call: CallbackCall) -> list[Injection | None]:
    """Call every `before_callback` (internal; the actor calls it right before the callback,
    or when a background task is spawned)."""
    return [instrument.before_callback(call) for instrument in instruments]


async def run(
    instruments: Sequence[Instrument],
    call: CallbackCall,
    injections: Sequence[Injection | None],
    fn: Callable[..., Awaitable[T]],
    *args: Any,
) -> T:
    """Run `fn(*args)` between the injections, then call every `after_callback` (internal)."""
    clock = time.perf_counter
    started = clock()
    outcome = CallbackOutcome.CANCELLED
    error: BaseException | None = None
    completed = inside = False
    try:
        for injection in reversed(injections):  # the last attached acts first
            if injection is not None and injection.entry is not None:
                await injection.entry()
        inside = True
        result = await fn(*args)
        inside = False
        completed = True
        for injection in injections:
            if injection is not None and injection.exit is not None:
                await injection.exit()
        outcome = CallbackOutcome.RETURNED
        return result
    except RecordRejected as exc:
        outcome, error = CallbackOutcome.REJECTED, exc
        completed = completed or inside
        raise
    except Exception as exc:
        outcome, error = CallbackOutcome.RAISED, exc
        raise
    finally:
        done = CallbackResult(
            outcome=outcome, duration=clock() - started, error=error, completed=completed
        )
        for instrument in instruments:
            instrument.after_callback(call, done)


async def observed(
    instruments: Sequence[Instrument],
    call: CallbackCall,
    fn: Callable[..., Awaitable[T]],
    *args: Any,
) -> T:
    """Run `fn(*args)` with `instruments` around it (internal: the actor's one way in)."""
    return await run(instruments, call, begin(instruments, call), fn, *args)
