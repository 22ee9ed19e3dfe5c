"""`ModuleSpec` (the child spec) and `Overflow`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from ..supervision import Backoff, Restart
from ._base import Module
from ._isolation import Isolation

__all__ = ["ModuleSpec", "Overflow", "resolved_overflow"]

M = TypeVar("M", bound=Module)


class Overflow(StrEnum):
    """What an `after_append` delivery does when the module's inbox is full."""

    BLOCK = "block"
    """Wait for room: `append` slows to the module's pace, memory stays bounded (default)."""
    DROP_OLDEST = "drop_oldest"
    """Drop the oldest queued delivery to make room; counted in the module's `dropped`."""
    DROP_NEWEST = "drop_newest"
    """Drop the new delivery; counted in the module's `dropped`."""
    FAIL = "fail"
    """Drop the new delivery (counted) and treat the overflow as a crash of the module."""
    CATCH_UP = "catch_up"
    """Durable modules only (their default): do not queue the delivery and do not wait; the
    module is marked lagging and reads the entries it missed back from storage when it gets
    there. Memory stays bounded and nothing is lost (see docs/delivery.md)."""


def _seconds(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        what = "a finite number of seconds >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"ModuleSpec.{name} must be {what}, got {value!r}")


@dataclass(frozen=True, slots=True)
class ModuleSpec(Generic[M]):
    """How a module is run and supervised (OTP's child spec); defaults in brackets.

    Raises:
        ValueError: an option is out of range (the message names it and the value).
    """

    module: M | Callable[[], M] | str
    """A `Module` instance, or a zero-argument factory (a class works) called for each
    incarnation: once at register (to learn the id), then on every restart; or the factory's
    name, `"package.module:Class"` (imported at register)."""
    restart: Restart = field(default=Restart.PERMANENT, kw_only=True)
    """When to restart it after it ends [PERMANENT]."""
    shutdown: float | None = field(default=5.0, kw_only=True)
    """Seconds `stop` may take (after draining) before the actor is cancelled; `0` cancels at
    once without calling `stop`; `None` waits forever [5.0]."""
    timeout: float | None = field(default=30.0, kw_only=True)
    """Seconds each init/start/hook/ask callback may take; expiry is a crash; `None` = no
    limit [30.0]."""
    inbox: int = field(default=64, kw_only=True)
    """Capacity of the inbox in `after_append` deliveries (records) [64]."""
    overflow: Overflow | None = field(default=None, kw_only=True)
    """What a delivery does when the inbox is full; `None` resolves at register to `CATCH_UP`
    for a durable module, else `BLOCK` [None]. A durable module accepts `BLOCK` or
    `CATCH_UP`; `CATCH_UP` needs `durable=True`."""
    depends_on: tuple[str, ...] = field(default=(), kw_only=True)
    """Ids of modules that must init/start before this one (and stop after it) [()]."""
    config: Mapping[str, Any] = field(default_factory=dict, kw_only=True)
    """Free-form settings, given to the module as `ctx.config` (read-only) [{}]."""
    backoff: Backoff | None = field(default=None, kw_only=True)
    """Restart backoff for this module; `None` uses `LedgerConfig.backoff` [None]."""
    durable: bool = field(default=False, kw_only=True)
    """Deliver every committed entry, in seq order, with no gap, at least once across
    restarts, reopens and crashes: the module catches up from storage from its position
    (`resume_after`, or the cursor the runtime keeps); needs a storage with the `CursorStore`
    capability [False]."""
    start_at: str = field(default="start", kw_only=True)
    """Where a durable module with no position yet starts: `"start"` (seq 0) or `"end"` (the
    head when it first starts) ["start"]."""

    isolation: Isolation = field(default=Isolation.TASK, kw_only=True)
    """Where its callbacks run: `TASK`, a trio task of the ledger's process, or `PROCESS`, a
    worker process of its own per incarnation (needs a factory importable by name and a
    JSON-serialisable `config`; see docs/isolation.md) [TASK]."""
    memory_limit: int | None = field(default=None, kw_only=True)
    """`PROCESS` only: the worker's address-space limit (`RLIMIT_AS`) in bytes; exceeding it
    is a crash of the module; `None` = no limit [None]."""
    id: str | None = field(default=None, kw_only=True)
    """Overrides the module's id (set on every instance the factory makes) [None]."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "restart", Restart(self.restart))
        object.__setattr__(self, "isolation", Isolation(self.isolation))
        limit = self.memory_limit
        if limit is not None:
            if type(limit) is not int or limit < 1:
                raise ValueError(
                    f"ModuleSpec.memory_limit must be an int of bytes >= 1 or None, got {limit!r}"
                )
            if self.isolation is not Isolation.PROCESS:
                raise ValueError(
                    f"ModuleSpec.memory_limit={limit} needs isolation=PROCESS (a task shares "
                    "the ledger's process and its memory)"
                )
        if self.overflow is not None:
            object.__setattr__(self, "overflow", Overflow(self.overflow))
        if type(self.durable) is not bool:
            raise ValueError(f"ModuleSpec.durable must be a bool, got {self.durable!r}")
        if self.start_at not in ("start", "end"):
            raise ValueError(f'ModuleSpec.start_at must be "start" or "end", got {self.start_at!r}')
        if self.overflow is Overflow.CATCH_UP and not self.durable:
            raise ValueError(
                "ModuleSpec.overflow=CATCH_UP needs durable=True (a non-durable module cannot "
                "read missed deliveries back from storage)"
            )
        if self.durable and self.overflow not in (None, Overflow.BLOCK, Overflow.CATCH_UP):
            raise ValueError(
                f"ModuleSpec.overflow of a durable module must be BLOCK or CATCH_UP, got "
                f"{self.overflow.value!r} (a durable module never drops deliveries)"
            )
        _seconds("shutdown", self.shutdown, allow_none=True)
        _seconds("timeout", self.timeout, allow_none=True)
        if self.timeout == 0:
            raise ValueError("ModuleSpec.timeout must be > 0 or None, got 0")
        if type(self.inbox) is not int or self.inbox < 1:
            raise ValueError(f"ModuleSpec.inbox must be an int >= 1, got {self.inbox!r}")
        deps: object = self.depends_on
        if not isinstance(deps, (tuple, list)) or not all(isinstance(d, str) for d in deps):
            raise ValueError(f"ModuleSpec.depends_on must be a tuple of ids, got {deps!r}")
        object.__setattr__(self, "depends_on", tuple(deps))
        if not isinstance(self.config, Mapping):
            raise ValueError(f"ModuleSpec.config must be a mapping, got {self.config!r}")
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))
        if self.backoff is not None and not isinstance(self.backoff, Backoff):
            raise ValueError(f"ModuleSpec.backoff must be a Backoff or None, got {self.backoff!r}")


def resolved_overflow(spec: ModuleSpec[Any]) -> Overflow:
    """The overflow policy in effect: `spec.overflow`, or its default (`CATCH_UP` for a durable
    module, `BLOCK` otherwise) when it is `None`."""
    if spec.overflow is not None:
        return spec.overflow
    return Overflow.CATCH_UP if spec.durable else Overflow.BLOCK
