"""What fault plans and probes record: one `CallbackEvent` per callback a module received."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from nucleus_actors import CallbackOutcome, Hash, Record

if TYPE_CHECKING:
    from ._faults import Fault

__all__ = ["Callback", "CallbackEvent", "CallbackLog", "CallOutcome"]


class Callback(StrEnum):
    """A place in a module where a fault can be injected (and that a probe records)."""

    INIT = "init"
    """`Module.init` (once per incarnation, first)."""
    START = "start"
    """`Module.start` (once per incarnation, after init)."""
    STOP = "stop"
    """`Module.stop` (on stop_all/terminate, before a restart, after a crash or exit)."""
    RESUME_AFTER = "resume_after"
    """`Module.resume_after` (durable modules that own their position; once per
    incarnation, after init, before start)."""
    BEFORE_APPEND = "before_append"
    """`Module.before_append` (only modules whose class overrides it)."""
    AFTER_APPEND = "after_append"
    """`Module.after_append` (only modules whose class overrides it)."""
    BACKGROUND = "background"
    """Background work the module runs with `ctx.spawn` (one call per spawned task)."""


CallOutcome = CallbackOutcome
"""How one callback call ended: the instrumentation seam's `CallbackOutcome` under the name the
testing toolkit has always used (one enum, so a `CallbackResult.outcome` is a `CallOutcome`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallbackEvent:
    """One callback a module received, recorded when the call ended."""

    module_id: str
    """Id of the module."""
    incarnation: int
    """Incarnation of the module (1 for its first run, +1 per restart; 0 if unknown)."""
    callback: Callback
    """Which callback."""
    call: int
    """1-based number of this call of `callback` for this module, across incarnations."""
    record: Record | None
    """The record (before_append: as received; after_append: the committed record)."""
    seq: int | None
    """after_append: the committed seq; otherwise None."""
    hash: Hash | None
    """after_append: the entry's chain hash; otherwise None."""
    outcome: CallOutcome
    """How the call ended (for the caller: an injected crash makes it RAISED)."""
    handled: bool
    """Whether the module's own callback ran to its end (returned, or vetoed the record).

    False when an injected fault stopped the call before the module's code ran or finished;
    an after_append delivery "reached" the module exactly when this is True."""
    fault: Fault | None = None
    """The fault injected into this call, if any."""
    error: str | None = None
    """`repr` of the exception the call raised, if any."""


class CallbackLog:
    """An append-only list of `CallbackEvent`s with the queries tests need.

    A `FaultPlan` and a `Probe` each own one (`plan.log`, `probe.log`); several probes or
    several incarnations of a factory-made module can share one.
    """

    __slots__ = ("_calls", "_events", "_hooks")

    def __init__(self) -> None:
        self._events: list[CallbackEvent] = []
        self._calls: dict[tuple[str, Callback], int] = {}
        self._hooks: dict[str, frozenset[Callback]] = {}

    def __repr__(self) -> str:
        return f"<CallbackLog {len(self._events)} events>"

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[CallbackEvent]:
        return iter(list(self._events))

    def add(self, event: CallbackEvent) -> None:
        """Record one event (used by plans and probes; tests normally only read)."""
        self._events.append(event)

    def note_hooks(self, module_id: str, hooks: frozenset[Callback]) -> None:
        """Note which append hooks the module's class overrides (it gets only those calls)."""
        self._hooks[module_id] = hooks

    def hooks(self, module_id: str) -> frozenset[Callback] | None:
        """The append hooks the module's class overrides, if known."""
        return self._hooks.get(module_id)

    def next_call(self, module_id: str, callback: Callback) -> int:
        """Count one more call of `callback` by `module_id`; return its 1-based number."""
        key = (module_id, callback)
        call = self._calls[key] = self._calls.get(key, 0) + 1
        return call

    @property
    def events(self) -> list[CallbackEvent]:
        """Every event, in the order the calls ended (a copy)."""
        return list(self._events)

    def module_ids(self) -> list[str]:
        """Ids of the modules with at least one event, in order of first appearance."""
        return list(dict.fromkeys(e.module_id for e in self._events))

    def of(self, module_id: str, callback: Callback | str | None = None) -> list[CallbackEvent]:
        """The events of one module, optionally of one callback only, in order."""
        wanted = None if callback is None else Callback(callback)
        return [
            e
            for e in self._events
            if e.module_id == module_id and (wanted is None or e.callback is wanted)
        ]

    def seen(self, module_id: str) -> list[int]:
        """Seqs of the after_append deliveries that reached the module (`handled`), in order.

        A record delivered again after a restart appears again if it had reached the module
        before the crash (at-least-once delivery).
        """
        return [
            e.seq
            for e in self.of(module_id, Callback.AFTER_APPEND)
            if e.handled and e.seq is not None
        ]

    def incarnations(self, module_id: str) -> list[int]:
        """The incarnations of one module that received any callback, in order."""
        return list(dict.fromkeys(e.incarnation for e in self.of(module_id)))

    def count(self, module_id: str, callback: Callback | str) -> int:
        """How many calls of `callback` the module received (faulted ones included)."""
        return len(self.of(module_id, callback))
