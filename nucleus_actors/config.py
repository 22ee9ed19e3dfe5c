"""`LedgerConfig`: everything that configures one ledger (and its supervisor)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .supervision import Backoff, Strategy

__all__ = ["LEDGER_ID_PATTERN", "LedgerConfig", "system_wall_clock"]

LEDGER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
"""A ledger id: 1..128 of letters, digits, `_`, `.`, `-`, starting with a letter or digit."""


def system_wall_clock() -> int:
    """UTC microseconds since the Unix epoch, from the system clock (the default clock)."""
    return time.time_ns() // 1000


def _positive(
    name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False
) -> None:
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"LedgerConfig.{name} must be a finite number {rule}, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerConfig:
    """Configuration of one ledger and its supervisor; defaults as in OTP (3 restarts in 5 s).

    Raises:
        ValueError: a field is out of range (the message names the field and the value).
    """

    ledger_id: str
    """Ledger name, bound into the genesis hash: see `LEDGER_ID_PATTERN`."""
    strategy: Strategy = Strategy.ONE_FOR_ONE
    """Which modules restart together when one crashes."""
    max_restarts: int = 3
    """Restart intensity: more than this many restarts ..."""
    restart_window: float = 5.0
    """... within this many seconds escalates (the ledger fails)."""
    backoff: Backoff | None = None
    """Delay between consecutive restarts of a module; `None` (default) restarts at once."""
    max_record_bytes: int = 1 << 20
    """Largest committed record, measured on its canonical bytes (default 1 MiB)."""
    wall_clock: Callable[[], int] = system_wall_clock
    """Source of record timestamps, UTC microseconds; timestamps never go backwards."""
    exit_timeout: float = 30.0
    """Cap on `stop_all` when leaving `async with` by cancellation, for `shutdown=None`."""
    max_batch: int = 1024
    """Most records one pipeline batch carries through hooks and storage."""
    cursor_interval: float = 1.0
    """Seconds a durable module's moved cursor may wait for a batch to ride with before it
    is stored on its own (its bound on redeliveries after a crash)."""
    merkle_tree: bool | None = None
    """Keep the Merkle tree (tiles in storage) for `root` and proofs: `None` (default) when the
    storage implements `TreeStore`, `True` requires it (open fails otherwise), `False` never."""
    idempotency_window: float = 86400.0
    """Seconds an idempotency key is remembered (a retry within it gets the first receipts)."""
    stall_warning: float | None = 0.1
    """Seconds a callback of a TASK module may block the event loop before a watchdog thread
    logs a warning and counts it in `ModuleStatus.stalls` (`None`: no watchdog)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ledger_id, str) or not LEDGER_ID_PATTERN.fullmatch(self.ledger_id):
            raise ValueError(
                f"LedgerConfig.ledger_id must be 1..128 letters, digits, '_', '.', '-' "
                f"starting with a letter or digit, got {self.ledger_id!r}"
            )
        object.__setattr__(self, "strategy", Strategy(self.strategy))
        if type(self.max_restarts) is not int or self.max_restarts < 0:
            raise ValueError(
                f"LedgerConfig.max_restarts must be an int >= 0, got {self.max_restarts!r}"
            )
        _positive("restart_window", self.restart_window)
        _positive("exit_timeout", self.exit_timeout, allow_zero=True)
        _positive("cursor_interval", self.cursor_interval)
        _positive("stall_warning", self.stall_warning, allow_none=True)
        if type(self.max_record_bytes) is not int or self.max_record_bytes < 64:
            raise ValueError(
                f"LedgerConfig.max_record_bytes must be an int >= 64, got {self.max_record_bytes!r}"
            )
        if not isinstance(self.idempotency_window, (int, float)) or not (
            0 < self.idempotency_window < float("inf")
        ):
            raise ValueError(
                f"idempotency_window must be a finite number of seconds > 0, "
                f"got {self.idempotency_window!r}"
            )
        if type(self.max_batch) is not int or self.max_batch < 1:
            raise ValueError(f"LedgerConfig.max_batch must be an int >= 1, got {self.max_batch!r}")
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise ValueError(
                f"LedgerConfig.backoff must be a Backoff or None, got {self.backoff!r}"
            )
        if self.merkle_tree is not None and not isinstance(self.merkle_tree, bool):
            raise ValueError(
                f"LedgerConfig.merkle_tree must be None, True or False, got {self.merkle_tree!r}"
            )
        if not callable(self.wall_clock):
            raise ValueError(f"LedgerConfig.wall_clock must be callable, got {self.wall_clock!r}")
