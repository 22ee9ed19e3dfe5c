"""Supervision vocabulary: restart types, strategies, backoff and the intensity window.

The same choices as Erlang/OTP's supervisor (see docs/supervision.md):

* `Restart`: when a crashed or exited module is restarted.
* `Strategy`: which modules restart together.
* Intensity: more than `max_restarts` restarts within `restart_window` seconds escalates.
* `Backoff`: optional delay before the k-th consecutive restart of a module.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Backoff", "Restart", "Strategy"]


class Restart(StrEnum):
    """When the supervisor restarts a module (OTP's `restart` child-spec key)."""

    PERMANENT = "permanent"
    """Always restarted, whether it crashed or exited normally (default)."""
    TRANSIENT = "transient"
    """Restarted only after a crash; a normal exit (`ctx.exit()`) leaves it STOPPED."""
    TEMPORARY = "temporary"
    """Never restarted: a crash leaves it FAILED, an exit STOPPED; the ledger goes on."""


class Strategy(StrEnum):
    """Which modules restart when one crashes (OTP's supervisor strategies)."""

    ONE_FOR_ONE = "one_for_one"
    """Only the crashed module (default)."""
    ONE_FOR_ALL = "one_for_all"
    """Every running module: all stopped in reverse start order, then started in order."""
    REST_FOR_ONE = "rest_for_one"
    """The crashed module and every module after it in start order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Delay before restarting a module that keeps crashing (off unless configured).

    Before the k-th consecutive restart (k = 0, 1, ...) the supervisor waits
    `min(max, initial * multiplier**k) * (1 + jitter * (2 * rng.random() - 1))` seconds on
    trio's clock (so `MockClock` drives it in tests). k goes back to 0 once the module has stayed
    RUNNING for `reset_after` seconds.
    """

    initial: float = 0.1
    """Delay before the first restart, in seconds."""
    multiplier: float = 2.0
    """Growth factor per consecutive restart (>= 1)."""
    max: float = 30.0
    """Cap on the delay before jitter, in seconds."""
    jitter: float = 0.0
    """Relative jitter in [0, 1]: 0.1 spreads each delay by +/-10 %."""
    reset_after: float = 30.0
    """Seconds RUNNING after which the consecutive-restart count resets."""
    rng: random.Random = field(default_factory=random.Random, compare=False)
    """Source of jitter; pass `random.Random(seed)` for reproducible delays."""

    def __post_init__(self) -> None:
        for name in ("initial", "max", "reset_after"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Backoff.{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.multiplier, (int, float)) and 1 <= self.multiplier < math.inf):
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier!r}")
        if not (isinstance(self.jitter, (int, float)) and 0 <= self.jitter <= 1):
            raise ValueError(f"Backoff.jitter must be within [0, 1], got {self.jitter!r}")

    def delay(self, k: int) -> float:
        """Seconds to wait before the k-th consecutive restart (draws from `rng` once)."""
        base = min(self.max, self.initial * self.multiplier**k)
        return float(base * (1 + self.jitter * (2 * self.rng.random() - 1)))


class IntensityWindow:
    """Restart timestamps over a sliding window (internal; one per supervisor, as in OTP)."""

    __slots__ = ("_stamps", "max_restarts", "window")

    def __init__(self, max_restarts: int, window: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self._stamps: deque[float] = deque()

    def admit(self, now: float) -> bool:
        """Record a restart at `now`; False when it makes more than `max_restarts` in window."""
        stamps = self._stamps
        while stamps and stamps[0] < now - self.window:  # OTP keeps R >= Now - Period
            stamps.popleft()
        stamps.append(now)
        return len(stamps) <= self.max_restarts
