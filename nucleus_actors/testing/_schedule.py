"""`FaultSchedule`: seeded random fault plans (same seed, same faults) for chaos tests."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Literal

from nucleus_actors import Record

from ._events import Callback
from ._faults import Action, Fault, FaultPlan

__all__ = ["FaultSchedule"]

_HOOKS = frozenset({Callback.BEFORE_APPEND, Callback.AFTER_APPEND})
_STARTUP = frozenset({Callback.INIT, Callback.RESUME_AFTER, Callback.START})


def _seq_is(modulus: int, remainder: int) -> Callable[[Record], bool]:
    def predicate(record: Record) -> bool:
        return record.seq is not None and record.seq % modulus == remainder

    predicate.__name__ = f"seq%{modulus}=={remainder}"
    return predicate


class FaultSchedule:
    """Random fault plans drawn from one seed: the same seed always gives the same plans.

    ```python
    schedule = FaultSchedule(seed)
    validator = schedule.plan("validator").wrap(Validator())
    sink = schedule.plan("sink", callbacks=["after_append", "stop"]).wrap(Sink)
    ...
    print(schedule.describe())     # seed and every plan, to replay a failing run
    ```

    Each `plan(name)` draws from its own generator seeded by `(seed, name)`, so adding a plan
    never changes the others. A plan has 0..`max_faults` faults, each a crash, hang, delay or
    (before_append) reject in one of `callbacks`, on the nth call (n in 1..`horizon`), on every
    k-th call (a few times), or where `seq % k == j` (after_append, once or twice). init and
    start faults skip the first call unless `startup` is true, so the ledger normally starts
    and the faults hit restarts.

    Args:
        seed: any int; printed by `describe()` (the pytest plugin prints it on failure).
        max_faults: most faults per plan [3].
        horizon: largest nth / every drawn [12].
        callbacks: where faults may go [every `Callback`].
        actions: which actions may be drawn [all four; REJECT only lands in before_append].
        startup: allow faults in the first init/start (startup then fails) [False].
        max_delay: longest DELAY drawn, in seconds [0.5].
        exit_faults: allow faults that act after the module's callback returned [True].
    """

    def __init__(
        self,
        seed: int,
        *,
        max_faults: int = 3,
        horizon: int = 12,
        callbacks: Iterable[Callback | str] = tuple(Callback),
        actions: Iterable[Action | str] = tuple(Action),
        startup: bool = False,
        max_delay: float = 0.5,
        exit_faults: bool = True,
    ) -> None:
        if type(seed) is not int:
            raise TypeError(f"FaultSchedule seed must be an int, got {seed!r}")
        if type(max_faults) is not int or max_faults < 0:
            raise ValueError(f"FaultSchedule max_faults must be an int >= 0, got {max_faults!r}")
        if type(horizon) is not int or horizon < 2:
            raise ValueError(f"FaultSchedule horizon must be an int >= 2, got {horizon!r}")
        if not max_delay >= 0:
            raise ValueError(f"FaultSchedule max_delay must be >= 0, got {max_delay!r}")
        self.seed = seed
        self.max_faults = max_faults
        self.horizon = horizon
        self.callbacks = tuple(Callback(c) for c in callbacks)
        self.actions = tuple(Action(a) for a in actions)
        if not self.callbacks or not self.actions:
            raise ValueError("FaultSchedule needs at least one callback and one action")
        self.startup = startup
        self.max_delay = max_delay
        self.exit_faults = exit_faults
        self.plans: dict[str, FaultPlan] = {}
        """Every plan made so far, by name."""

    def __repr__(self) -> str:
        return f"<FaultSchedule seed={self.seed} plans={list(self.plans)}>"

    def describe(self) -> str:
        """The seed and every plan made so far, one per line."""
        lines = [f"fault schedule seed={self.seed}"]
        lines += [f"  {name}: {plan.describe(named=False)}" for name, plan in self.plans.items()]
        return "\n".join(lines)

    def rng(self, name: str) -> random.Random:
        """A generator seeded by `(seed, name)`: for the test's own random choices."""
        return random.Random(f"{self.seed}:{name}")

    def plan(
        self,
        name: str,
        *,
        callbacks: Iterable[Callback | str] | None = None,
        max_faults: int | None = None,
    ) -> FaultPlan:
        """The plan named `name` (drawn once, then the same object on every call).

        Args:
            name: usually the module id.
            callbacks: restrict this plan to these callbacks [the schedule's].
            max_faults: override the schedule's `max_faults` for this plan.
        """
        existing = self.plans.get(name)
        if existing is not None:
            return existing
        rng = random.Random(f"{self.seed}:plan:{name}")
        allowed = self.callbacks if callbacks is None else tuple(Callback(c) for c in callbacks)
        limit = self.max_faults if max_faults is None else max_faults
        plan = FaultPlan(
            (self._draw(rng, allowed) for _ in range(rng.randint(0, limit))), name=name
        )
        self.plans[name] = plan
        return plan

    def _draw(self, rng: random.Random, callbacks: tuple[Callback, ...]) -> Fault:
        callback = rng.choice(callbacks)
        actions = [
            a for a in self.actions if a is not Action.REJECT or callback is Callback.BEFORE_APPEND
        ] or [Action.CRASH]
        action = rng.choice(actions)
        first = 2 if callback in _STARTUP and not self.startup else 1
        nth: int | None = None
        every: int | None = None
        times: int | None = None
        where: Callable[[Record], bool] | None = None
        pick = rng.random()
        if callback is Callback.AFTER_APPEND and pick < 0.2:
            modulus = rng.randint(3, self.horizon)
            where = _seq_is(modulus, rng.randrange(modulus))
            times = rng.randint(1, 2)
        elif pick < 0.7:
            nth = rng.randint(first, max(first, self.horizon))
        else:
            every = rng.randint(max(2, first), self.horizon)
            times = rng.randint(1, 3)
        at: Literal["entry", "exit"] = "entry"
        if self.exit_faults and callback in _HOOKS and rng.random() < 0.25:
            at = "exit"
        seconds = round(rng.uniform(0, self.max_delay), 3) if action is Action.DELAY else 0.0
        return Fault(
            callback=callback,
            action=action,
            nth=nth,
            every=every,
            where=where,
            times=times,
            at=at,
            seconds=seconds,
        )
