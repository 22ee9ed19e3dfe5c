"""Declarative fault plans: crash, hang, delay or reject a module's callbacks on cue.

A `FaultPlan` lists faults (`Fault` values); `plan.wrap(module)` makes a module obey them. It
injects through the runtime's instrumentation seam (`attach_instrument`): the module keeps its
class, id and version untouched, and the runtime calls the plan around every callback it runs
(so wrapping never makes a module take part in appends it did not take part in before: a hook
its class does not override is never called, hence never faulted).
"""

from __future__ import annotations

import importlib
import math
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal, TypeVar, overload

import trio

from nucleus_actors import (
    CallbackCall,
    CallbackResult,
    Injection,
    Instrument,
    Module,
    ModuleSpec,
    NucleusError,
    Record,
    RecordRejected,
    attach_instrument,
    attached_instruments,
)

from ._events import Callback, CallbackEvent, CallbackLog

__all__ = ["Action", "Fault", "FaultPlan", "InjectedFault"]

M = TypeVar("M", bound=Module)
T = TypeVar("T")

_RECORD_CALLBACKS = frozenset({Callback.BEFORE_APPEND, Callback.AFTER_APPEND})
_PLANS_ATTR = "_nucleus_fault_plans"


class Action(StrEnum):
    """What an injected fault does."""

    CRASH = "crash"
    """Raise an exception (`InjectedFault` unless the fault names another error type): a crash
    of the module (in `stop`: a stop error)."""
    HANG = "hang"
    """Never return: the module's `timeout` (or, in `stop`, its `shutdown`) ends the call, as
    a crash (or a cancelled stop). With `timeout=None`/`shutdown=None` it hangs for good."""
    DELAY = "delay"
    """Sleep `seconds` on trio's clock, then carry on normally (a slow module)."""
    REJECT = "reject"
    """`before_append` only: raise `RecordRejected(reason)` (a veto, not a crash)."""


class InjectedFault(NucleusError):
    """The error an injected crash raises (unless its `Fault` names another error type).

    Attributes:
        module_id: id of the module the fault was injected into.
        callback: the `Callback` it was injected into.
        call: the 1-based call number of that callback (per module, across incarnations).
    """

    def __init__(
        self,
        message: str,
        *,
        module_id: str | None = None,
        callback: Callback | None = None,
        call: int | None = None,
    ) -> None:
        super().__init__(message)
        self.module_id = module_id
        self.callback = callback
        self.call = call


def _count(name: str, value: object) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise ValueError(f"Fault.{name} must be an int >= 1 or None, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One fault: what to do, in which callback, and on which calls.

    A call *matches* when `where` (if given) holds for its record. Among matching calls the
    fault fires on the `nth` one only, or on every `every`-th one, or (neither given) on each
    one, at most `times` times in all. Calls are counted per module id across incarnations:
    "the 3rd after_append" is the 3rd delivery the module was handed, redeliveries included.

    Raises:
        ValueError: an option is out of range or does not fit the callback (the message names
            it and the value).
    """

    callback: Callback
    """Where to inject it."""
    action: Action
    """What it does."""
    nth: int | None = None
    """Fire on the nth matching call only (1-based)."""
    every: int | None = None
    """Fire on every `every`-th matching call (every=2: the 2nd, 4th, ...)."""
    where: Callable[[Record], bool] | None = field(default=None, compare=False)
    """Only calls whose record satisfies this predicate match (before_append/after_append)."""
    times: int | None = None
    """Fire at most this many times in all (None: no limit)."""
    at: Literal["entry", "exit"] = "entry"
    """"entry": act before the module's own callback runs (it never sees the call);
    "exit": act after it returned (it did see the call: a crash then means a redelivery)."""
    seconds: float = 0.0
    """DELAY: how long to sleep."""
    reason: str = "rejected by an injected fault"
    """REJECT: the veto reason."""
    error: type[Exception] = InjectedFault
    """CRASH: the exception type to raise (called with one message argument)."""
    label: str | None = None
    """Optional description shown instead of `where`'s repr in `describe()`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "callback", Callback(self.callback))
        object.__setattr__(self, "action", Action(self.action))
        _count("nth", self.nth)
        _count("every", self.every)
        _count("times", self.times)
        if self.nth is not None and self.every is not None:
            raise ValueError(
                f"Fault takes nth or every, not both (got nth={self.nth}, every={self.every})"
            )
        if self.where is not None and self.callback not in _RECORD_CALLBACKS:
            raise ValueError(
                f"Fault.where needs a callback that gets a record (before_append or "
                f"after_append), got {self.callback.value!r}"
            )
        if self.action is Action.REJECT and self.callback is not Callback.BEFORE_APPEND:
            raise ValueError(
                f"a REJECT fault only fits before_append, got callback {self.callback.value!r}"
            )
        if self.at not in ("entry", "exit"):
            raise ValueError(f"Fault.at must be 'entry' or 'exit', got {self.at!r}")
        seconds = self.seconds
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ValueError(f"Fault.seconds must be a finite number >= 0, got {seconds!r}")
        if not (isinstance(self.error, type) and issubclass(self.error, Exception)):
            raise ValueError(f"Fault.error must be an Exception subclass, got {self.error!r}")

    def describe(self) -> str:
        """One line such as `crash after_append nth=3` (used in plan and schedule reports)."""
        parts = [self.action.value, self.callback.value]
        if self.action is Action.DELAY:
            parts.append(f"seconds={self.seconds:g}")
        if self.nth is not None:
            parts.append(f"nth={self.nth}")
        if self.every is not None:
            parts.append(f"every={self.every}")
        if self.where is not None:
            parts.append(f"where={self.label or getattr(self.where, '__name__', 'predicate')}")
        elif self.label is not None:
            parts.append(self.label)
        if self.times is not None:
            parts.append(f"times={self.times}")
        if self.at != "entry":
            parts.append(f"at={self.at}")
        if self.action is Action.CRASH and self.error is not InjectedFault:
            parts.append(f"error={self.error.__name__}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class _Decision:
    call: int
    fault: Fault | None


class _PlanInstrument(Instrument):
    """How a plan sits on the seam: decide in `before_callback`, log in `after_callback`."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._decisions: dict[int, _Decision] = {}  # id(call) -> its decision, until it ends

    def before_callback(self, call: CallbackCall) -> Injection | None:
        plan = self.plan
        callback = Callback(call.callback)
        record = call.record if callback in _RECORD_CALLBACKS else None
        decision = plan._decide(call.module_id, callback, record)
        self._decisions[id(call)] = decision
        fault = decision.fault
        if fault is None:
            return None

        async def act() -> None:
            await plan._act(fault, call.module_id, callback, decision.call, call.pid)

        return Injection(entry=act) if fault.at == "entry" else Injection(exit=act)

    def after_callback(self, call: CallbackCall, result: CallbackResult) -> None:
        decision = self._decisions.pop(id(call))
        callback = Callback(call.callback)
        record = call.record if callback in _RECORD_CALLBACKS else None
        seq = record.seq if record is not None and callback is Callback.AFTER_APPEND else None
        self.plan.log.add(
            CallbackEvent(
                module_id=call.module_id,
                incarnation=call.incarnation,
                callback=callback,
                call=decision.call,
                record=record,
                seq=seq,
                hash=call.hash,
                outcome=result.outcome,
                handled=result.completed,
                fault=decision.fault,
                error=None if result.error is None else repr(result.error),
            )
        )


class FaultPlan:
    """A list of faults to inject into modules, and a log of every call they received.

    ```python
    plan = FaultPlan().crash("after_append", nth=3).hang("stop")
    engine.register(plan.wrap(MyModule()))      # or plan.wrap(MyModule): a factory
    ...
    assert plan.log.seen("my-module") == [0, 1, 2, 3, 4]
    ```

    Build it with the chainable `crash`, `hang`, `delay`, `reject` (or `add(Fault(...))`),
    then `wrap` modules. Calls are counted per module id across incarnations, so one plan can
    wrap several modules; when several faults would fire on the same call, the one added first
    wins and the others let that call pass (their counters still advance). Use one plan per
    ledger: incarnations are tracked by module id.

    Attributes:
        log: every call the wrapped modules received (`CallbackEvent`s), faulted or not.
        name: optional label shown by `describe()`.
    """

    def __init__(self, faults: Iterable[Fault] = (), *, name: str | None = None) -> None:
        self._faults: list[Fault] = []
        self.name = name
        self.log = CallbackLog()
        self._calls: dict[tuple[str, Callback], int] = {}
        self._matches: dict[tuple[str, int], int] = {}
        self._fired: dict[tuple[str, int], int] = {}
        self._instrument = _PlanInstrument(self)
        for fault in faults:
            self.add(fault)

    def __repr__(self) -> str:
        return f"<FaultPlan {self.describe()}>"

    def describe(self, *, named: bool = True) -> str:
        """The plan in one line: `name: fault; fault; ...` (`no faults` when empty).

        Args:
            named: prefix the plan's name, if it has one [True].
        """
        body = "; ".join(f.describe() for f in self._faults) or "no faults"
        return f"{self.name}: {body}" if self.name and named else body

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The faults, in the order they were added."""
        return tuple(self._faults)

    # -- building --------------------------------------------------------------------------
    def add(self, fault: Fault) -> FaultPlan:
        """Add a fault; returns the plan (chainable).

        Raises:
            TypeError: `fault` is not a `Fault`.
        """
        if not isinstance(fault, Fault):
            raise TypeError(f"FaultPlan.add takes a Fault, got {type(fault).__name__}")
        self._faults.append(fault)
        return self

    def crash(
        self,
        callback: Callback | str,
        *,
        nth: int | None = None,
        every: int | None = None,
        where: Callable[[Record], bool] | None = None,
        times: int | None = None,
        at: Literal["entry", "exit"] = "entry",
        error: type[Exception] = InjectedFault,
    ) -> FaultPlan:
        """Make `callback` raise `error` (a crash) on the selected calls; chainable.

        Raises:
            ValueError: see `Fault`.
        """
        return self.add(
            Fault(
                callback=Callback(callback),
                action=Action.CRASH,
                nth=nth,
                every=every,
                where=where,
                times=times,
                at=at,
                error=error,
            )
        )

    def hang(
        self,
        callback: Callback | str,
        *,
        nth: int | None = None,
        every: int | None = None,
        where: Callable[[Record], bool] | None = None,
        times: int | None = None,
        at: Literal["entry", "exit"] = "entry",
    ) -> FaultPlan:
        """Make `callback` never return on the selected calls (its deadline ends it); chainable.

        A hung init/start/hook/background call ends when the module's `timeout` expires (a
        crash); a hung `stop` when its `shutdown` expires (the actor is cancelled). With
        `timeout=None` or `shutdown=None` the hang lasts until the ledger closes.

        Raises:
            ValueError: see `Fault`.
        """
        return self.add(
            Fault(
                callback=Callback(callback),
                action=Action.HANG,
                nth=nth,
                every=every,
                where=where,
                times=times,
                at=at,
            )
        )

    def delay(
        self,
        callback: Callback | str,
        seconds: float,
        *,
        nth: int | None = None,
        every: int | None = None,
        where: Callable[[Record], bool] | None = None,
        times: int | None = None,
        at: Literal["entry", "exit"] = "entry",
    ) -> FaultPlan:
        """Make `callback` sleep `seconds` (trio's clock) on the selected calls; chainable.

        A delay longer than the module's `timeout` is a crash, as for any slow callback.

        Raises:
            ValueError: see `Fault`.
        """
        return self.add(
            Fault(
                callback=Callback(callback),
                action=Action.DELAY,
                seconds=seconds,
                nth=nth,
                every=every,
                where=where,
                times=times,
                at=at,
            )
        )

    def reject(
        self,
        *,
        reason: str = "rejected by an injected fault",
        nth: int | None = None,
        every: int | None = None,
        where: Callable[[Record], bool] | None = None,
        times: int | None = None,
        at: Literal["entry", "exit"] = "entry",
    ) -> FaultPlan:
        """Make `before_append` veto the selected records with `RecordRejected(reason)`.

        Only modules whose class overrides `before_append` can reject. Chainable.

        Raises:
            ValueError: see `Fault`.
        """
        return self.add(
            Fault(
                callback=Callback.BEFORE_APPEND,
                action=Action.REJECT,
                reason=reason,
                nth=nth,
                every=every,
                where=where,
                times=times,
                at=at,
            )
        )

    # -- queries ---------------------------------------------------------------------------
    def calls(self, module_id: str, callback: Callback | str) -> int:
        """How many calls of `callback` the module has received so far (across incarnations)."""
        return self._calls.get((module_id, Callback(callback)), 0)

    def fired(self, module_id: str | None = None) -> list[CallbackEvent]:
        """The calls a fault was injected into (of one module, or of all), in order."""
        return [
            e
            for e in self.log
            if e.fault is not None and (module_id is None or e.module_id == module_id)
        ]

    def seen(self, module_id: str) -> list[int]:
        """Shorthand for `plan.log.seen(module_id)`: seqs that reached the module, in order."""
        return self.log.seen(module_id)

    # -- wrapping --------------------------------------------------------------------------
    @overload
    def wrap(self, module: ModuleSpec[M]) -> ModuleSpec[M]: ...

    @overload
    def wrap(self, module: M) -> M: ...

    @overload
    def wrap(self, module: Callable[[], M]) -> Callable[[], M]: ...

    def wrap(self, module: Any) -> Any:
        """Make a module obey this plan, keeping its id, version and type.

        * An instance gets the plan attached (`attach_instrument`) and is returned: the same
          object, its class untouched.
        * A zero-argument factory (a class works) gives a factory that wraps each instance it
          makes (a fresh one per restart); the call counters live in the plan.
        * A `ModuleSpec` gives a copy whose module is wrapped as above.

        Wrapping an instance twice with the same plan is a no-op; wrapping it with two plans
        applies both (the last one's faults act first).

        Raises:
            TypeError: not a Module, a factory or a ModuleSpec.
        """
        if isinstance(module, ModuleSpec):
            target: Any = module.module
            if isinstance(target, str):  # "package.module:Class": the factory it names
                target = _import(target)
            return replace(module, module=self.wrap(target))
        if isinstance(module, Module):
            return self._wrap_instance(module)
        if callable(module):
            factory: Callable[[], object] = module
            plan = self

            def faulty_factory() -> Any:
                made = factory()
                if not isinstance(made, Module):
                    return made  # the registry reports the bad factory
                return plan._wrap_instance(made)

            faulty_factory.__name__ = f"faulty_{getattr(factory, '__name__', 'factory')}"
            faulty_factory.__qualname__ = faulty_factory.__name__
            # An isolated module's worker builds its instance from what this wraps.
            faulty_factory.__wrapped__ = factory  # type: ignore[attr-defined]
            setattr(faulty_factory, _PLANS_ATTR, (*getattr(factory, _PLANS_ATTR, ()), self))
            return faulty_factory
        raise TypeError(
            f"FaultPlan.wrap takes a Module, a zero-argument factory or a ModuleSpec, "
            f"got {type(module).__name__}"
        )

    def _wrap_instance(self, instance: M) -> M:
        cls = type(instance)
        hooks = frozenset(
            hook
            for hook in (Callback.BEFORE_APPEND, Callback.AFTER_APPEND)
            if cls.overrides(hook.value)
        )
        module_id = getattr(instance, "id", None)
        if isinstance(module_id, str):
            self.log.note_hooks(module_id, hooks)
        attach_instrument(instance, self._instrument)
        return instance

    # -- injecting -------------------------------------------------------------------------
    def _decide(self, module_id: str, callback: Callback, record: Record | None) -> _Decision:
        key = (module_id, callback)
        call = self._calls[key] = self._calls.get(key, 0) + 1
        chosen: Fault | None = None
        for index, fault in enumerate(self._faults):
            if fault.callback is not callback:
                continue
            if fault.where is not None and (record is None or not fault.where(record)):
                continue
            mkey = (module_id, index)
            match = self._matches[mkey] = self._matches.get(mkey, 0) + 1
            if fault.times is not None and self._fired.get(mkey, 0) >= fault.times:
                continue
            if fault.nth is not None and match != fault.nth:
                continue
            if fault.every is not None and match % fault.every:
                continue
            if chosen is None:
                chosen = fault
                self._fired[mkey] = self._fired.get(mkey, 0) + 1
        return _Decision(call, chosen)

    async def _act(
        self, fault: Fault, module_id: str, callback: Callback, call: int, pid: int | None
    ) -> None:
        action = fault.action
        if pid is not None and action in (Action.CRASH, Action.HANG):
            # An isolated module: the fault happens to its worker process for real. CRASH
            # kills it (SIGKILL: the runtime reports "worker exited by signal 9"); HANG makes
            # its main thread block in `time.sleep` (SIGUSR1), so the module's timeout (or
            # shutdown) has the worker killed. Either way this call never returns.
            os.kill(pid, signal.SIGKILL if action is Action.CRASH else signal.SIGUSR1)
            await trio.sleep_forever()
        if action is Action.CRASH:
            message = (
                f"injected crash in {callback.value} of module {module_id!r} "
                f"(call {call}: {fault.describe()})"
            )
            if fault.error is InjectedFault:
                raise InjectedFault(message, module_id=module_id, callback=callback, call=call)
            raise fault.error(message)
        if action is Action.HANG:
            await trio.sleep_forever()
        elif action is Action.DELAY:
            await trio.sleep(fault.seconds)
        else:
            raise RecordRejected(fault.reason)


def _import(target: str) -> Any:
    """The object `"package.module:Qualname"` names."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def plans_of(target: object) -> tuple[FaultPlan, ...]:
    """The plans a module, factory or spec was wrapped with (internal helper)."""
    if isinstance(target, ModuleSpec):
        target = target.module
    if isinstance(target, Module):
        return tuple(i.plan for i in attached_instruments(target) if isinstance(i, _PlanInstrument))
    plans = getattr(target, _PLANS_ATTR, ())
    return tuple(p for p in plans if isinstance(p, FaultPlan))
