"""The lifecycle state machines as data: which event moves a module (or the ledger) where.

This module is the **only writer** of `ModuleState` (`enter`) and of the ledger `Phase`
(`PhaseMachine.fire`). Everything else reports events: an actor reports "init ok", "start ok";
the supervisor (`_supervisor.py`) decides what a crash, an exit or a stop means and fires the
matching event here. A (state, event) pair missing from the table is a bug in the runtime:
it raises `IllegalTransition` when `STRICT` is set (the test suite sets it) and is logged and
applied otherwise, so a production ledger never dies of its own bookkeeping.

docs/lifecycle.md draws `MODULE_TABLE` and `PHASE_TABLE`; a test checks that its diagrams are
exactly `mermaid(...)` of these tables.

Later features build on this structure: an isolated (process) module reports the same events
from its worker, and durable delivery adds actions, not states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

import trio
from trio_util import AsyncValue

from .lifecycle import ModuleState, Phase

if TYPE_CHECKING:
    from .module._actor import Child

__all__ = [
    "MODULE_TABLE",
    "PHASE_TABLE",
    "IllegalTransition",
    "ModuleEvent",
    "PhaseEvent",
    "PhaseMachine",
    "enter",
    "mermaid",
    "register",
]

log = logging.getLogger("nucleus_actors.supervisor")

STRICT = False
"""Raise `IllegalTransition` on a (state, event) pair the tables do not list (tests set it)."""


class IllegalTransition(BaseException):
    """Internal: the runtime tried a lifecycle transition its tables do not allow.

    A `BaseException`, not an `Exception`: raised inside an actor it must not be taken for a
    crash of the module (and hidden by a restart); it propagates to the engine's boundary.
    """


class ModuleEvent(StrEnum):
    """What happened to a module, as the supervisor saw it (the diagram's edge labels)."""

    INIT_OK = "init ok"
    START_OK = "start ok"
    STARTUP_FAILED = "init / start fails at startup"
    CRASH_RESTART = "crash / exit, to be restarted"
    CRASH_FAILED = "crash, not restarted"
    EXIT_STOPPED = "exit, not restarted"
    GROUP_RESTART = "group restart stops it"
    RESTART_FAILED = "restart's init / start fails"
    BOOT_FAILED = "init / start fails, not retried"
    TEMPORARY_LEFT = "TEMPORARY, left out of a group restart"
    STOP = "stop_all() / terminate(id)"
    STOPPED = "stopped (stop returned, or cancelled)"
    STOP_FAILED = "stop raised"
    ESCALATED = "intensity exceeded"
    ABANDONED = "ledger stopped before its restart"
    STOP_WITHDRAWN = "ledger stopped before the group stopped it"


S = ModuleState
E = ModuleEvent

MODULE_TABLE: Mapping[tuple[ModuleState, ModuleEvent], ModuleState] = {
    # startup (init_all, start_all) and dynamic add: the actor reports init ok / start ok
    (S.REGISTERED, E.INIT_OK): S.INITIALIZED,
    (S.INITIALIZED, E.START_OK): S.RUNNING,
    (S.REGISTERED, E.START_OK): S.RUNNING,  # add(): init + start in one go
    (S.REGISTERED, E.STARTUP_FAILED): S.FAILED,
    (S.INITIALIZED, E.STARTUP_FAILED): S.FAILED,
    (S.RUNNING, E.STARTUP_FAILED): S.FAILED,
    (S.STOPPED, E.STARTUP_FAILED): S.FAILED,  # add() failed after its incarnation ended
    (S.FAILED, E.STARTUP_FAILED): S.FAILED,
    # crashes and exits, decided by restart type and phase
    (S.RUNNING, E.CRASH_RESTART): S.RESTARTING,
    (S.RESTARTING, E.CRASH_RESTART): S.RESTARTING,  # shown at detection, confirmed at unwind
    (S.RUNNING, E.CRASH_FAILED): S.FAILED,
    (S.INITIALIZED, E.CRASH_FAILED): S.FAILED,
    (S.STOPPING, E.CRASH_FAILED): S.FAILED,
    (S.RESTARTING, E.CRASH_FAILED): S.FAILED,
    (S.FAILED, E.CRASH_FAILED): S.FAILED,
    (S.RUNNING, E.EXIT_STOPPED): S.STOPPED,
    (S.INITIALIZED, E.EXIT_STOPPED): S.STOPPED,
    (S.STOPPING, E.EXIT_STOPPED): S.STOPPED,
    (S.RESTARTING, E.EXIT_STOPPED): S.STOPPED,
    (S.FAILED, E.EXIT_STOPPED): S.FAILED,
    # restart rounds
    (S.RUNNING, E.GROUP_RESTART): S.RESTARTING,
    (S.STOPPED, E.GROUP_RESTART): S.RESTARTING,  # OTP: exited / terminated members too
    (S.FAILED, E.GROUP_RESTART): S.RESTARTING,
    (S.RESTARTING, E.GROUP_RESTART): S.RESTARTING,
    (S.RESTARTING, E.TEMPORARY_LEFT): S.STOPPED,
    (S.RESTARTING, E.RESTART_FAILED): S.RESTARTING,
    (S.RESTARTING, E.START_OK): S.RUNNING,
    (S.RESTARTING, E.ESCALATED): S.FAILED,
    (S.FAILED, E.ESCALATED): S.FAILED,
    # manual restart(id): init + start again
    (S.STOPPED, E.START_OK): S.RUNNING,
    (S.FAILED, E.START_OK): S.RUNNING,
    (S.STOPPED, E.BOOT_FAILED): S.FAILED,
    (S.FAILED, E.BOOT_FAILED): S.FAILED,
    (S.RESTARTING, E.BOOT_FAILED): S.FAILED,
    (S.REGISTERED, E.BOOT_FAILED): S.FAILED,
    # stopping (stop_all, terminate, escalation, rollback, abort)
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.INITIALIZED, E.STOP): S.STOPPING,
    (S.REGISTERED, E.STOP): S.STOPPING,
    (S.RESTARTING, E.STOP): S.STOPPING,
    (S.STOPPED, E.STOP): S.STOPPING,  # still unwinding its best-effort stop after an exit
    (S.STOPPING, E.STOPPED): S.STOPPED,
    (S.RUNNING, E.STOPPED): S.STOPPED,  # cancelled without `stop` (abort, kill)
    (S.INITIALIZED, E.STOPPED): S.STOPPED,
    (S.RESTARTING, E.STOPPED): S.STOPPED,
    (S.STOPPED, E.STOPPED): S.STOPPED,
    (S.FAILED, E.STOPPED): S.FAILED,  # a stop never hides a failure
    (S.STOPPING, E.STOP_FAILED): S.FAILED,
    (S.RUNNING, E.STOP_FAILED): S.FAILED,
    (S.INITIALIZED, E.STOP_FAILED): S.FAILED,
    (S.STOPPED, E.STOP_FAILED): S.FAILED,
    (S.FAILED, E.STOP_FAILED): S.FAILED,
    (S.RESTARTING, E.ABANDONED): S.FAILED,
    (S.RESTARTING, E.STOP_WITHDRAWN): S.RUNNING,
}
"""(current state, event) -> next state. Anything else is an illegal transition."""

del S, E


def register(child: Child) -> None:
    """A new module starts REGISTERED (the `[*] --> REGISTERED` edge)."""
    child.state = ModuleState.REGISTERED
    child.state_value = AsyncValue(ModuleState.REGISTERED)


def enter(child: Child, event: ModuleEvent) -> ModuleState:
    """Move `child` by `event` (the only place that writes a module's state); return the state.

    Raises:
        IllegalTransition: the table has no such (state, event) pair, and `STRICT` is set.
    """
    current = child.state
    target = MODULE_TABLE.get((current, event))
    if target is None:
        message = (
            f"illegal transition of module {child.id!r}: {current.name} on {event.value!r} "
            "(not in MODULE_TABLE)"
        )
        if STRICT:
            raise IllegalTransition(message)
        log.error("%s", message)
        return current
    if target is not current:
        if current is ModuleState.RUNNING and child.running_since is not None:
            child.last_run = trio.current_time() - child.running_since
            child.running_since = None
        child.state = target
        if target is ModuleState.RUNNING:
            child.running_since = trio.current_time()
            child.armed = True  # started at least once: before_append is fail-closed from now
        child.state_value.value = target
    return target


class PhaseEvent(StrEnum):
    """What happened to a ledger (the phase diagram's edge labels)."""

    INIT_ALL_OK = "init_all() ok"
    START_ALL_OK = "start_all() ok"
    STOP = "stop_all() / leaving `async with`"
    STOPPED = "every module stopped"
    CLOSED = "closed or stopped before init_all()"
    STARTUP_FAILED = "init_all() / start_all() fails (rolled back)"
    ESCALATED = "restart intensity exceeded (escalation)"


P = Phase
PE = PhaseEvent

PHASE_TABLE: Mapping[tuple[Phase, PhaseEvent], Phase] = {
    (P.CREATED, PE.INIT_ALL_OK): P.INITIALIZED,
    (P.INITIALIZED, PE.START_ALL_OK): P.RUNNING,
    (P.RUNNING, PE.STOP): P.STOPPING,
    (P.INITIALIZED, PE.STOP): P.STOPPING,
    (P.STOPPING, PE.STOPPED): P.STOPPED,
    (P.CREATED, PE.CLOSED): P.STOPPED,
    (P.CREATED, PE.STARTUP_FAILED): P.FAILED,
    (P.INITIALIZED, PE.STARTUP_FAILED): P.FAILED,
    (P.RUNNING, PE.ESCALATED): P.FAILED,
}
"""(current phase, event) -> next phase. FAILED is final: every event leaves it FAILED."""

del P, PE


class PhaseMachine:
    """The ledger's phase (the only writer of `Phase`), observable with `wait_value`."""

    __slots__ = ("_changed", "value")

    def __init__(self, changed: Callable[[Phase], None]) -> None:
        self.value = AsyncValue(Phase.CREATED)
        self._changed = changed  # the engine wakes `wait_length` waiters on STOPPED/FAILED

    @property
    def phase(self) -> Phase:
        phase: Phase = self.value.value
        return phase

    def fire(self, event: PhaseEvent) -> Phase:
        """Move the ledger by `event`; return the phase.

        Raises:
            IllegalTransition: not in `PHASE_TABLE` (and not from FAILED), with `STRICT` set.
        """
        current = self.phase
        if current is Phase.FAILED:
            return current  # final: a late stop or close does not hide the failure
        target = PHASE_TABLE.get((current, event))
        if target is None:
            message = f"illegal ledger transition: {current.name} on {event.value!r}"
            if STRICT:
                raise IllegalTransition(message)
            log.error("%s", message)
            return current
        if target is not current:
            self.value.value = target
            self._changed(target)
        return target


def mermaid(table: Mapping[tuple[StrEnum, StrEnum], StrEnum], initial: str) -> str:
    """A mermaid `stateDiagram-v2` of a table: one edge per (from, to), its events joined
    with "; " (self-loops are not drawn).

    `initial` labels the edge from `[*]` into the first state of the enum.
    """
    edges: dict[tuple[str, str], list[str]] = {}
    for (source, event), target in table.items():
        if source is target:
            continue  # staying put is not drawn
        edges.setdefault((source.name, target.name), []).append(event.value)
    first = next(iter(table))[0].name
    lines = ["stateDiagram-v2", f"    [*] --> {first}: {initial}"]
    for (begin, end), events in edges.items():
        lines.append(f"    {begin} --> {end}: {'; '.join(events)}")
    finals = sorted({t.name for t in table.values() if t.name in ("STOPPED", "FAILED")})
    lines.extend(f"    {name} --> [*]" for name in finals)
    return "\n".join(lines)
