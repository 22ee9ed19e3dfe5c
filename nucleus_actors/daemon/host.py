"""What the HTTP layer sees of the daemon: its ledgers (`LedgerHost`) and `DaemonState`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..engine import LedgerEngine
from ..lifecycle import Phase
from .config import LedgerSettings
from .guards import ByteBudget, HostAllowList, HttpLimits
from .metrics import DaemonMetrics
from .problems import Problem

if TYPE_CHECKING:
    from .checkpoints import CheckpointSigner

__all__ = ["DaemonState", "LedgerHost"]


class LedgerHost:
    """One ledger served by the daemon: its settings, its engine and whether it serves.

    The daemon runs each engine in its own task; `serving` is true from a successful
    `start_all` until the ledger stops or fails. `notify()` wakes every stream waiting on the
    ledger (when it fails or stops, or when the daemon stops); streams learn of new entries
    from `engine.wait_length`.
    """

    def __init__(
        self, settings: LedgerSettings, engine: LedgerEngine, storage_path: Path | None
    ) -> None:
        self.settings = settings
        """The ledger's `[[ledgers]]` table."""
        self.engine = engine
        """The ledger's engine (the source of truth)."""
        self.storage_path = storage_path
        """The SQLite file, or None for an in-memory ledger."""
        self.serving = False
        """True while the engine is RUNNING inside its task and may be read and written."""
        self.failure: BaseException | None = None
        """Why the ledger failed (startup error or `LedgerFailed`), else None."""
        self.signer: CheckpointSigner | None = None
        """Signs the ledger's checkpoints (None: no `checkpoint_key` configured)."""
        self.verified_entries = 0
        """Entries the last completed full verification covered (0 before one completed)."""
        self.verify_failed = False
        """The last full verification found an entry that does not verify."""
        self.role: str | None = None
        """PostgreSQL ledgers: `"writer"` (holds the lease) or `"standby"` (serves reads,
        refuses writes); None for SQLite and memory ledgers (always the writer)."""
        self.epoch: int | None = None
        """PostgreSQL ledgers: the lease epoch this daemon writes under (writer) or last saw
        (standby)."""
        self.takeovers = 0
        """PostgreSQL ledgers: times this daemon took the ledger over from another writer."""
        self.fenced = 0
        """PostgreSQL ledgers: times this daemon's writer was fenced (a newer epoch refused
        its writes)."""
        self.factory: Callable[[bool], LedgerEngine] | None = None
        """PostgreSQL ledgers: makes a new engine, `factory(standby)` (a writer's with its
        modules, a standby's without)."""
        self._changed = trio.Event()

    def check_writable(self) -> None:
        """Refuse a write on a ledger this daemon does not write.

        Raises:
            Problem: `not-writer` (503) on a PostgreSQL standby.
        """
        if self.role == "standby":
            raise Problem(
                "not-writer",
                f"this daemon is a standby for ledger {self.id!r} (epoch {self.epoch}): it "
                "serves reads, another daemon writes it; send writes to the writer (the "
                "daemon whose /readyz?role=writer answers 200)",
                ledger=self.id,
                role="standby",
                epoch=self.epoch,
            )

    def readiness(self) -> dict[str, object]:
        """What `/readyz` says of this ledger: phase, and for PostgreSQL role and epoch."""
        out: dict[str, object] = {"phase": str(self.phase), "role": self.role or "writer"}
        if self.role is not None:
            out["epoch"] = self.epoch
        return out

    @property
    def id(self) -> str:
        """The ledger id."""
        return self.settings.id

    @property
    def phase(self) -> Phase:
        """The engine's phase."""
        return self.engine.phase

    @property
    def changed(self) -> trio.Event:
        """An event set at the next `notify()`: take it, check, then wait (no lost wakeup)."""
        return self._changed

    def notify(self) -> None:
        """Wake everything waiting on `changed` (and arm a fresh event)."""
        self._changed.set()
        self._changed = trio.Event()


class DaemonState:
    """The daemon as the HTTP API sees it: ledgers, token, limits, and whether it is stopping."""

    def __init__(
        self,
        hosts: Mapping[str, LedgerHost],
        *,
        token: str | None,
        max_body_bytes: int,
        metrics: DaemonMetrics | None = None,
        reads: str = "open",
        read_token: str | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        self.hosts: dict[str, LedgerHost] = dict(hosts)
        """Ledgers by id, in configuration order."""
        self.token = token or None
        """The API token writes need, or None when writes are open."""
        self.max_body_bytes = max_body_bytes
        """Largest request body accepted."""
        self.stopping = False
        """Set once shutdown began: streams end, `/readyz` answers 503."""
        self.reads = reads
        """`"open"`, or `"token"`: reads need the read token or the API token."""
        self.read_token = read_token or None
        """A token accepted for reads only (with `reads = "token"`), or None."""
        self.metrics = DaemonMetrics() if metrics is None else metrics
        """What `/metrics` serves (a fresh registry unless the daemon passes its own)."""
        self.metrics.watch(self.hosts.values)
        self.limits = HttpLimits() if limits is None else limits
        """HTTP limits: `read_timeout`, `max_connections`, `max_batch_records`, ..."""
        self.budget = ByteBudget(self.limits.body_budget_bytes)
        """The byte budget shared by large request bodies."""
        self.allowed_hosts: HostAllowList | None = (
            None if self.limits.allowed_hosts is None else HostAllowList(self.limits.allowed_hosts)
        )
        """The `Host` values answered; None answers any (the daemon sets the defaults once it
        knows its port)."""
        self.stopped = trio.Event()
        """Set with `stopping` (what waiters wait on)."""
        self.body_scopes: set[trio.CancelScope] = set()
        """Cancel scopes of request bodies being read: `begin_stopping` cancels them (the
        writes are refused with 503, nothing was acted on)."""

    def lookup(self, ledger: str) -> LedgerHost:
        """The host of `ledger`.

        Raises:
            Problem: `unknown-ledger` (404), naming the ledgers this daemon serves.
        """
        host = self.hosts.get(ledger)
        if host is None:
            raise Problem(
                "unknown-ledger",
                f"no ledger {ledger!r} in this daemon (it serves {', '.join(self.hosts)})",
                ledger=ledger,
            )
        return host

    def begin_stopping(self) -> None:
        """Mark the daemon as stopping and end every stream."""
        self.stopping = True
        self.stopped.set()
        for scope in list(self.body_scopes):
            scope.cancel()
        for host in self.hosts.values():
            host.notify()
