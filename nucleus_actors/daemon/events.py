"""Module lifecycle events (crashes, restarts, state changes) of each ledger, with a bounded
history, and the read-only routes that serve them: `GET /v1/ledgers/{ledger}/events` (SSE) and
`GET /v1/ledgers/{ledger}/statistics`.

The events are observed, not emitted by the runtime: one watcher task per module waits on the
public `ModuleHandle.wait_state` (any state but the current one, or `POLL_SECONDS`) and compares
`ModuleHandle.status` snapshots. A crash or restart is therefore never missed even when the
module passes through a state faster than the watcher looks (the `crashes` and `restarts`
counters only grow), and the runtime needs no hook. `watch_lifecycle` runs the watchers for the
daemon's lifetime (the daemon starts it once its ledgers are up).
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

import trio
from fastapi import FastAPI, Header, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..lifecycle import ModuleState
from ..registry import ModuleHandle, ModuleStatus
from .problems import Problem
from .wire import dumps as _dumps

if TYPE_CHECKING:
    from ..module import Module
    from .host import DaemonState, LedgerHost

__all__ = [
    "HISTORY",
    "LifecycleEvent",
    "LifecycleLog",
    "install_events",
    "lifecycle_log",
    "watch_lifecycle",
]

HISTORY: Final = 1000
"""Events kept per ledger; older ones are forgotten (a resuming client sees the gap in `id`)."""
POLL_SECONDS: Final = 0.5
"""A watcher also compares counters this often (a restart may not change the state)."""
HEARTBEAT_SECONDS: Final = 15.0
"""An events stream with nothing to send writes a comment line this often."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LifecycleEvent:
    """One thing that happened to a module."""

    id: int
    """Position in the ledger's event sequence: 1, 2, 3... (consecutive; the SSE `id`)."""
    ledger: str
    """Ledger id."""
    module: str
    """Module id."""
    type: str
    """"state" (its state changed, or the first snapshot), "crash" or "restart"."""
    state: str
    """The module's state after the event."""
    previous: str | None
    """Its state before a "state" event (None for the first snapshot and other types)."""
    incarnation: int
    """Its incarnation after the event."""
    restarts: int
    """Its restart count after the event."""
    crashes: int
    """Its crash count after the event."""
    count: int
    """How many crashes or restarts this event stands for (1, more if several happened
    between two looks); 1 for "state"."""
    last_error: str | None
    """Its last crash or stop error (`repr`), or None."""
    time: int
    """When the watcher saw it: UTC microseconds since the Unix epoch."""

    def json(self) -> dict[str, Any]:
        """The event as a JSON object (the SSE `data`)."""
        return {
            "id": self.id,
            "ledger": self.ledger,
            "module": self.module,
            "type": self.type,
            "state": self.state,
            "previous": self.previous,
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "crashes": self.crashes,
            "count": self.count,
            "last_error": self.last_error,
            "time": self.time,
        }


class LifecycleLog:
    """The last `capacity` lifecycle events of one ledger, and a way to wait for more."""

    def __init__(self, ledger: str, capacity: int = HISTORY) -> None:
        self.ledger = ledger
        self._events: deque[LifecycleEvent] = deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._last = 0
        self._added = trio.Event()

    @property
    def last_id(self) -> int:
        """Id of the newest event (0 when there is none yet)."""
        return self._last

    def add(
        self,
        status: ModuleStatus,
        type: str,
        *,
        previous: ModuleState | None = None,
        count: int = 1,
    ) -> LifecycleEvent:
        """Append an event built from a status snapshot and wake every waiter."""
        event = LifecycleEvent(
            id=next(self._ids),
            ledger=self.ledger,
            module=status.id,
            type=type,
            state=str(status.state),
            previous=None if previous is None else str(previous),
            incarnation=status.incarnation,
            restarts=status.restarts,
            crashes=status.crashes,
            count=count,
            last_error=status.last_error,
            time=time.time_ns() // 1000,
        )
        self._events.append(event)
        self._last = event.id
        self._added.set()
        self._added = trio.Event()
        return event

    def after(self, event_id: int) -> list[LifecycleEvent]:
        """The kept events whose id is greater than `event_id`, oldest first."""
        return [event for event in self._events if event.id > event_id]

    async def wait_after(self, event_id: int) -> None:
        """Wait until an event newer than `event_id` exists. Cancellation: just stops waiting."""
        while self._last <= event_id:
            await self._added.wait()


_LOGS: weakref.WeakKeyDictionary[LedgerHost, LifecycleLog] = weakref.WeakKeyDictionary()


def lifecycle_log(host: LedgerHost) -> LifecycleLog:
    """The event log of a ledger (created empty on first use)."""
    log = _LOGS.get(host)
    if log is None:
        log = _LOGS[host] = LifecycleLog(host.id)
    return log


def _changes(log: LifecycleLog, before: ModuleStatus, now: ModuleStatus) -> None:
    # Crash first, then the state it caused, then the restart: the order they happen in.
    if now.crashes > before.crashes:
        log.add(now, "crash", count=now.crashes - before.crashes)
    if now.state is not before.state:
        log.add(now, "state", previous=before.state)
    if now.restarts > before.restarts:
        log.add(now, "restart", count=now.restarts - before.restarts)


async def _watch_module(
    log: LifecycleLog, handle: ModuleHandle[Module], before: ModuleStatus
) -> None:
    while True:
        others = [state for state in ModuleState if state is not before.state]
        with trio.move_on_after(POLL_SECONDS):
            await handle.wait_state(*others)
        now = handle.status
        _changes(log, before, now)
        before = now


async def watch_lifecycle(state: DaemonState) -> None:
    """Record every module's lifecycle events until the daemon stops.

    Starts with one "state" event per module (its state now), then one event per change.
    Cancellation: the watchers stop; the logs keep what they recorded.
    """
    hosts = list(state.hosts.values())
    if not hosts:
        return
    async with trio.open_nursery() as nursery:
        for host in hosts:
            log = lifecycle_log(host)
            for handle in host.engine.modules:
                first = handle.status
                log.add(first, "state")  # in start order, before any watcher runs
                nursery.start_soon(_watch_module, log, handle, first)
        while not state.stopping:
            await hosts[0].changed.wait()  # `begin_stopping` notifies every host
        nursery.cancel_scope.cancel()


# -- routes -----------------------------------------------------------------------------------
class LifecycleEventOut(BaseModel):
    """One module lifecycle event (the `data` of an `event: lifecycle` SSE message)."""

    id: int = Field(description="1, 2, 3... per ledger (also the SSE id)")
    ledger: str
    module: str
    type: str = Field(description='"state", "crash" or "restart"')
    state: str = Field(description="the module's state after the event")
    previous: str | None = Field(description='the state before a "state" event')
    incarnation: int
    restarts: int
    crashes: int
    count: int = Field(description="crashes or restarts this event stands for")
    last_error: str | None
    time: int = Field(description="UTC microseconds since the Unix epoch")


class ModuleCountsOut(BaseModel):
    """How many modules are in each group of states."""

    specs: int
    running: int
    restarting: int
    stopped: int
    failed: int


class StatisticsOut(BaseModel):
    """A ledger's counters since the daemon opened it."""

    ledger: str
    length: int
    head: str = Field(description="chain hash of the last entry (the genesis hash if empty)")
    phase: str
    appends: int = Field(description="records committed since the daemon opened the ledger")
    rejects: int = Field(description="records vetoed by a module's before_append")
    crashes: int = Field(description="module crashes (a failed restart counts as one)")
    restarts: int = Field(description="module restarts, group and manual ones included")
    modules: ModuleCountsOut
    last_event: int = Field(description="id of the newest lifecycle event (0: none yet)")
    time: int = Field(description="when this snapshot was taken, UTC microseconds")


async def _events_body(state: DaemonState, log: LifecycleLog, after: int) -> AsyncIterator[str]:
    """The SSE body: kept events newer than `after`, then new ones, until the daemon stops."""
    sent = after
    while True:
        woken = next(iter(state.hosts.values())).changed  # take it, check, then wait
        if state.stopping:
            return
        events = log.after(sent)
        for event in events:
            yield f"id: {event.id}\nevent: lifecycle\ndata: {_dumps(event.json())}\n\n"
            sent = event.id
        if events:
            continue
        if not await _wait_event(log, sent, woken):
            yield ": keep-alive\n\n"


async def _wait_event(log: LifecycleLog, sent: int, woken: trio.Event) -> bool:
    """Wait for an event newer than `sent` or for `woken` (True), or `HEARTBEAT_SECONDS`
    (False)."""
    with trio.move_on_after(HEARTBEAT_SECONDS):
        async with trio.open_nursery() as nursery:

            async def new_event() -> None:
                await log.wait_after(sent)
                nursery.cancel_scope.cancel()

            async def stopping() -> None:
                await woken.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(new_event)
            nursery.start_soon(stopping)
        return True
    return False


def install_events(app: FastAPI, state: DaemonState) -> None:
    """Add `GET /v1/ledgers/{ledger}/events` and `GET /v1/ledgers/{ledger}/statistics`."""

    lookup = state.lookup

    @app.get(
        "/v1/ledgers/{ledger}/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "content": {"text/event-stream": {"schema": LifecycleEventOut.model_json_schema()}},
                "description": "Server-sent events: `event: lifecycle`, `id` = event id, "
                "`data` = a LifecycleEvent object",
            },
            404: {"content": {"application/problem+json": {}}, "description": "unknown ledger"},
            422: {"content": {"application/problem+json": {}}, "description": "bad query"},
        },
        summary="Module lifecycle events: the kept history, then live (server-sent events)",
    )
    async def events(
        ledger: Annotated[str, PathParam(description="ledger id")],
        after: Annotated[
            int | None,
            Query(ge=0, description="send events with a greater id (default 0: all kept)"),
        ] = None,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="Last-Event-ID",
                pattern=r"^ *[0-9]{0,19} *$",
                description="resume after this event id (empty: from `after`)",
            ),
        ] = None,
    ) -> Response:
        host = lookup(ledger)
        start = after or 0
        if last_event_id is not None and last_event_id.strip():
            text = last_event_id.strip()
            # ASCII digits only ('²'.isdigit() is true), at most 19 of them
            if not (text.isascii() and text.isdigit() and len(text) <= 19):
                raise Problem(
                    "invalid-request",
                    f"Last-Event-ID must be a lifecycle event id, got {last_event_id!r}",
                    ledger=ledger,
                )
            start = int(text)
        return StreamingResponse(
            _events_body(state, lifecycle_log(host), start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get(
        "/v1/ledgers/{ledger}/statistics",
        response_model=StatisticsOut,
        responses={
            404: {"content": {"application/problem+json": {}}, "description": "unknown ledger"}
        },
        summary="Counters of a ledger (appends, rejects, crashes, restarts, module states)",
    )
    async def statistics(ledger: Annotated[str, PathParam(description="ledger id")]) -> Response:
        host = lookup(ledger)
        engine = host.engine
        s = engine.state
        stats = engine.statistics()
        counts = engine.modules.counts()
        return JSONResponse(
            {
                "ledger": ledger,
                "length": s.length,
                "head": s.head.hex(),
                "phase": str(s.phase),
                "appends": stats.appends,
                "rejects": stats.rejects,
                "crashes": stats.crashes,
                "restarts": stats.restarts,
                "modules": {
                    "specs": counts.specs,
                    "running": counts.running,
                    "restarting": counts.restarting,
                    "stopped": counts.stopped,
                    "failed": counts.failed,
                },
                "last_event": lifecycle_log(host).last_id,
                "time": time.time_ns() // 1000,
            }
        )
