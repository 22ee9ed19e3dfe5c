r"""The two lifecycle vocabularies: ledger `Phase` and `ModuleState`.

```
Phase:        CREATED -> INITIALIZED -> RUNNING -> STOPPING -> STOPPED
                   \____________\___________\________________-> FAILED
ModuleState:  REGISTERED -> INITIALIZED -> RUNNING <-> RESTARTING
                                              \-> STOPPING -> STOPPED      (FAILED on a crash
                                                                            that is not restarted)
```
The legal transitions are tables in `_transitions.py` (the only writer of both);
docs/lifecycle.md draws them, and a test checks the drawing against the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .record import Hash

__all__ = ["LedgerState", "ModuleState", "Phase", "StopResult"]


class Phase(StrEnum):
    """Phase of a ledger (`engine.state.phase`)."""

    CREATED = "created"
    """Modules may be registered; nothing runs yet."""
    INITIALIZED = "initialized"
    """`init_all` ran: every module's `init` succeeded."""
    RUNNING = "running"
    """`start_all` ran: appends are accepted, modules run and are supervised."""
    STOPPING = "stopping"
    """`stop_all` is draining and stopping modules; new appends fail fast."""
    STOPPED = "stopped"
    """Every module stopped; reads still work until the engine is closed."""
    FAILED = "failed"
    """Startup rolled back, or the supervisor escalated; every module was stopped."""


class ModuleState(StrEnum):
    """State of one module (`handle.state`)."""

    REGISTERED = "registered"
    """Registered, not initialized yet."""
    INITIALIZED = "initialized"
    """`init` succeeded; waiting for `start`."""
    RUNNING = "running"
    """`start` succeeded; receiving hooks and asks."""
    RESTARTING = "restarting"
    """Crashed (or part of a group restart); the supervisor is restarting it."""
    STOPPING = "stopping"
    """Draining its inbox and running `stop`."""
    STOPPED = "stopped"
    """Stopped cleanly, or cancelled after overstaying `shutdown`, or exited normally."""
    FAILED = "failed"
    """Crashed and will not be restarted (TEMPORARY, startup failure, escalation, stop error)."""


class StopResult(StrEnum):
    """How a module last stopped (`ModuleStatus.stop_result`)."""

    CLEAN = "clean"
    """`stop` returned."""
    ERROR = "error"
    """`stop` raised (the module ends FAILED)."""
    CANCELLED = "cancelled"
    """Cancelled: it overstayed its `shutdown`, or `shutdown=0`."""
    EXITED = "exited"
    """It ended itself (`ctx.exit()`, or essential background work returned)."""
    ABANDONED = "abandoned"
    """The ledger stopped before its pending restart; its undelivered entries are lost to it."""


@dataclass(frozen=True, slots=True)
class LedgerState:
    """Snapshot of a ledger: its phase, its length and its head hash."""

    phase: Phase
    """Lifecycle phase of the ledger."""
    length: int
    """Number of committed entries (the next seq)."""
    head: Hash
    """Chain hash after the last entry; the genesis hash `CHAIN_-1` when empty."""
