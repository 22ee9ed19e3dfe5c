"""Lifecycle: ordering, depends_on, rollback, wrong-phase errors, registry rules."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from nucleus_actors import (
    LedgerConfig,
    LedgerEngine,
    LifecycleError,
    Module,
    ModuleContext,
    ModuleError,
    ModuleSpec,
    ModuleState,
    Phase,
    Record,
    RegistryError,
    Restart,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, StorageBatch
from tests.conftest import FOREVER, Gate, Recorder, lifecycle, settle

Log = list[tuple[str, str, Any]]


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="test", **kw)


async def test_lifecycle_order_and_reverse_stop() -> None:
    log: Log = []
    async with LedgerEngine(config()) as engine:
        assert engine.phase is Phase.CREATED
        for name in ("a", "b", "c"):
            engine.register(Recorder(name, log))
        await engine.init_all()
        assert engine.phase is Phase.INITIALIZED
        assert [h.state for h in engine.modules] == [ModuleState.INITIALIZED] * 3
        await engine.start_all()
        assert engine.phase is Phase.RUNNING
        await engine.stop_all()
        assert engine.phase is Phase.STOPPED
        assert [h.state for h in engine.modules] == [ModuleState.STOPPED] * 3
    assert lifecycle(log) == [
        ("a", "init"), ("b", "init"), ("c", "init"),
        ("a", "start"), ("b", "start"), ("c", "start"),
        ("c", "stop"), ("b", "stop"), ("a", "stop"),
    ]  # fmt: skip
    assert [s.stop_result for s in engine.modules.status()] == ["clean"] * 3


async def test_depends_on_reorders_and_stop_is_reverse() -> None:
    log: Log = []
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("app", log), depends_on=("db", "cache"))
        engine.register(Recorder("cache", log), depends_on=("db",))
        engine.register(Recorder("db", log))
        engine.register(Recorder("metrics", log))
        await engine.init_all()
        assert [h.id for h in engine.modules] == ["db", "cache", "app", "metrics"]
        await engine.start_all()
    assert [m for m, e in lifecycle(log) if e == "init"] == ["db", "cache", "app", "metrics"]
    assert [m for m, e in lifecycle(log) if e == "stop"] == ["metrics", "app", "cache", "db"]


@pytest.mark.parametrize(
    ("deps", "match"),
    [
        ({"a": ("b",), "b": ("c",), "c": ("a",)}, r"dependency cycle: a -> b -> c -> a"),
        ({"a": ("ghost",)}, r"module 'a' depends on unknown module 'ghost'"),
    ],
)
async def test_bad_dependencies_fail_before_any_init(
    deps: dict[str, tuple[str, ...]], match: str
) -> None:
    log: Log = []
    async with LedgerEngine(config()) as engine:
        for name in ("a", "b", "c"):
            engine.register(Recorder(name, log), depends_on=deps.get(name, ()))
        with pytest.raises(RegistryError, match=match):
            await engine.init_all()
    assert log == []


def test_self_dependency_is_refused() -> None:
    engine = LedgerEngine(config())
    with pytest.raises(RegistryError, match="module 'a' depends on itself"):
        engine.register(Recorder("a", []), depends_on=("a",))


@pytest.mark.parametrize("failing", ["init", "start"])
async def test_startup_failure_rolls_back_in_reverse(failing: str) -> None:
    log: Log = []
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("a", log))
        engine.register(Recorder("b", log))
        engine.register(Recorder("c", log, fail={failing: lambda n, _: True}))
        engine.register(Recorder("d", log))
        await engine.init_all() if failing == "start" else None
        call = engine.start_all if failing == "start" else engine.init_all
        with pytest.raises(ModuleError, match=rf"module 'c' failed in {failing}") as info:
            await call()
        assert info.value.module_id == "c"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert engine.phase is Phase.FAILED
        states = {h.id: h.state for h in engine.modules}
        assert states["c"] is ModuleState.FAILED
        assert states["a"] is states["b"] is ModuleState.STOPPED
        with pytest.raises(LifecycleError, match=r"is FAILED \(append needs RUNNING\)"):
            await engine.append(Record("k", 1))
    stops = [m for m, e in lifecycle(log) if e == "stop"]
    if failing == "init":
        assert stops == ["b", "a"]  # c never initialized: its stop is not called
    else:
        # c was initialized, then its start failed: it is stopped first, then the rest.
        assert stops == ["c", "d", "b", "a"]


async def test_crash_during_startup_rolls_back() -> None:
    log: Log = []

    class Flaky(Module):
        id = "flaky"

        async def init(self, ctx: Any) -> None:
            async def boom() -> None:
                await trio.lowlevel.checkpoint()
                raise ValueError("background failure during startup")

            ctx.spawn(boom)

    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("a", log))
        engine.register(Flaky())
        await engine.init_all()
        await trio.sleep(0.01)
        with pytest.raises(ModuleError, match=r"module 'flaky' crashed during startup"):
            await engine.start_all()
        assert engine.phase is Phase.FAILED
    assert ("a", "stop") in lifecycle(log)


async def test_wrong_phase_errors_name_phase_and_rule() -> None:
    engine = LedgerEngine(config())
    with pytest.raises(LifecycleError, match=r"engine is not open \(use `async with engine:`\)"):
        await engine.init_all()
    async with engine:
        with pytest.raises(LifecycleError, match=r"'test' is CREATED \(append needs RUNNING\)"):
            await engine.append(Record("k", 1))
        with pytest.raises(LifecycleError, match=r"start_all needs INITIALIZED"):
            await engine.start_all()
        await engine.init_all()
        with pytest.raises(LifecycleError, match=r"register needs CREATED; use `await engine.add"):
            engine.register(Recorder("late", []))
        with pytest.raises(LifecycleError, match=r"init_all needs CREATED"):
            await engine.init_all()
        await engine.start_all()
        await engine.stop_all()
        with pytest.raises(LifecycleError, match=r"is STOPPED \(append needs RUNNING\)"):
            await engine.append(Record("k", 1))
        await engine.stop_all()  # idempotent
    with pytest.raises(LifecycleError, match="was already opened"):
        async with engine:
            pass
    with pytest.raises(LifecycleError, match="engine is closed"):
        await engine.get(0)


class Named(Module):
    def __init__(self, module_id: Any) -> None:
        self.id = module_id


def test_registry_rules() -> None:
    engine = LedgerEngine(config())
    engine.register(Named("a"))
    with pytest.raises(RegistryError, match="module 'a' is already present"):
        engine.register(Named("a"))
    with pytest.raises(RegistryError, match="takes a Module, a zero-argument factory"):
        engine.register(42)  # type: ignore[call-overload]
    with pytest.raises(RegistryError, match=r"returned int, not a Module"):
        engine.register(lambda: 42)  # type: ignore[call-overload]
    with pytest.raises(RegistryError, match=r"raised ValueError\('nope'\) when called at register"):
        engine.register(lambda: (_ for _ in ()).throw(ValueError("nope")))
    for bad in ("", "has space", "-lead", "x" * 129, None):
        with pytest.raises(RegistryError, match=r"module id must be 1\.\.128"):
            engine.register(Named(bad))

    class NoId(Module):
        pass

    with pytest.raises(RegistryError, match="got None"):
        engine.register(NoId())
    with pytest.raises(ValueError, match=r"ModuleSpec.inbox must be an int >= 1, got 0"):
        engine.register(Named("b"), inbox=0)
    with pytest.raises(ValueError, match=r"ModuleSpec.shutdown must be a finite number"):
        engine.register(Named("b"), shutdown=-1)
    with pytest.raises(ValueError, match="'sometimes' is not a valid Restart"):
        engine.register(Named("b"), restart="sometimes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        engine.register(Named("b"), colour=1)


async def test_register_accepts_instances_factories_and_specs() -> None:
    made: list[Module] = []

    def factory() -> Recorder:
        module = Recorder("made", [])
        made.append(module)
        return module

    async with open_ledger(
        config(),
        modules=[
            Recorder("plain", []),
            factory,
            ModuleSpec(Recorder("spec", []), inbox=3, restart="temporary"),
        ],
    ) as engine:
        assert [h.id for h in engine.modules] == ["plain", "made", "spec"]
        assert len(made) == 1  # called once at register; that instance is the first run
        assert engine.modules.get("made").status.incarnation == 1
        assert await engine.modules.get("made").ask(lambda m: m) is made[0]


async def test_registry_lookup_by_type_and_id() -> None:
    class Other(Recorder):
        pass

    async with open_ledger(
        config(), modules=[Recorder("r1", []), Recorder("r2", []), Other("o", [])]
    ) as engine:
        assert engine.modules.get(Other).id == "o"
        with pytest.raises(RegistryError, match=r"3 modules are instances of Recorder"):
            engine.modules.get(Recorder)
        with pytest.raises(RegistryError, match=r"no module is an instance of Gate"):
            engine.modules.get(Gate)
        with pytest.raises(RegistryError, match=r"no module with id 'nope'"):
            engine.modules.get("nope")
        assert "r1" in engine.modules
        assert "nope" not in engine.modules
        assert len(engine.modules) == 3
        counts = engine.modules.counts()
        assert (counts.specs, counts.running, counts.failed) == (3, 3, 0)


async def test_two_ledgers_share_nothing() -> None:
    log_a: Log = []
    log_b: Log = []
    async with (
        open_ledger(LedgerConfig(ledger_id="a"), modules=[Recorder("m", log_a)]) as a,
        open_ledger(LedgerConfig(ledger_id="b"), modules=[Recorder("m", log_b)]) as b,
    ):
        ra = await a.append(Record("k", {"same": True}))
        rb = await b.append(Record("k", {"same": True}))
        assert (ra.seq, rb.seq) == (0, 0)
        assert ra.hash != rb.hash  # genesis is bound to the ledger id
        await a.append(Record("k", 2))
        assert (a.state.length, b.state.length) == (2, 1)
        assert a.modules.get("m")._child is not b.modules.get("m")._child
    assert [e for _, e, _ in log_a].count("after") == 2
    assert [e for _, e, _ in log_b].count("after") == 1


async def test_leaving_the_block_stops_running_modules() -> None:
    log: Log = []
    async with open_ledger(config(), modules=[Recorder("a", log), Recorder("b", log)]):
        pass
    assert [m for m, e in lifecycle(log) if e == "stop"] == ["b", "a"]


async def test_body_exception_propagates_unwrapped_after_stop() -> None:
    log: Log = []
    with pytest.raises(KeyError, match="boom"):
        async with open_ledger(config(), modules=[Recorder("a", log)]):
            raise KeyError("boom")
    assert ("a", "stop") in lifecycle(log)


# -- review finding 1. A crash or exit while init/start runs never answers the lifecycle request
class CrashesWhileStarting(Module):
    """Its background task fails while `init` (or `start`) is still running."""

    id = "crashy"

    def __init__(self, during: str) -> None:
        self.during = during

    async def _boom(self) -> None:
        await trio.sleep(1)
        raise ValueError("background failure while starting")

    async def init(self, ctx: ModuleContext) -> None:
        if self.during == "init":
            ctx.spawn(self._boom)
            await trio.sleep(5)

    async def start(self, ctx: ModuleContext) -> None:
        if self.during == "start":
            ctx.spawn(self._boom)
            await trio.sleep(5)


# Regression: review 1: A crash or exit while init/start runs never answers the lifecycle request
@pytest.mark.parametrize("during", ["init", "start"])
async def test_crash_while_init_or_start_runs_fails_startup(
    mock_clock: trio.testing.MockClock, during: str
) -> None:
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("a", []))
        engine.register(CrashesWhileStarting(during))
        with pytest.raises(ModuleError, match="crashy"), trio.fail_after(FOREVER):
            await engine.init_all()
            await engine.start_all()
        assert engine.phase is Phase.FAILED


# Regression: review 1: A crash or exit while init/start runs never answers the lifecycle request
async def test_crash_during_a_restarts_init_does_not_wedge_the_supervisor(
    mock_clock: trio.testing.MockClock,
) -> None:
    incarnations: list[int] = []

    class Flaky(Recorder):
        async def init(self, ctx: ModuleContext) -> None:
            incarnations.append(ctx.incarnation)
            if ctx.incarnation == 2:  # the restart's init: background work fails meanwhile
                ctx.spawn(self._boom)
                await trio.sleep(5)

        async def _boom(self) -> None:
            await trio.sleep(1)
            raise ValueError("background failure during a restart")

    flaky = Flaky("flaky", [], fail={"after": lambda n, _: n == 1})
    async with open_ledger(config(max_restarts=10, restart_window=1.0)) as engine:
        handle = await engine.add(flaky)
        await engine.append(Record("k", 1))  # crash -> restart; its init crashes too
        await handle.wait_state(ModuleState.RESTARTING)
        with trio.move_on_after(FOREVER) as hung:
            await handle.wait_state(ModuleState.RUNNING)  # a 3rd incarnation must follow
        assert not hung.cancelled_caught, "the supervisor is stuck in the failed restart"
        assert incarnations == [1, 2, 3]


# Regression: review 1: A crash or exit while init/start runs never answers the lifecycle request
async def test_exit_during_start_fails_add_instead_of_hanging(
    mock_clock: trio.testing.MockClock,
) -> None:
    class ExitsInStart(Module):
        id = "quitter"

        async def start(self, ctx: ModuleContext) -> None:
            ctx.exit()
            await trio.sleep(1)

    async with open_ledger(config()) as engine:
        with trio.move_on_after(FOREVER) as hung:
            with contextlib.suppress(ModuleError):  # refusing is fine; hanging is not
                await engine.add(ExitsInStart(), restart=Restart.TEMPORARY)
        assert not hung.cancelled_caught, "add() never returned"


# Regression: review 1: A crash or exit while init/start runs never answers the lifecycle request
async def test_exit_between_init_and_start_does_not_hang_start_all(
    mock_clock: trio.testing.MockClock,
) -> None:
    class OneShotWarmup(Module):
        """Spawns a one-shot task in init, forgetting exit_on_return=False."""

        id = "warmup"

        async def init(self, ctx: ModuleContext) -> None:
            async def warm() -> None:
                await trio.lowlevel.checkpoint()

            ctx.spawn(warm)

    async with LedgerEngine(config()) as engine:
        engine.register(OneShotWarmup(), restart=Restart.TRANSIENT)
        await engine.init_all()
        await settle()  # the module has exited: its actor is gone
        with trio.move_on_after(FOREVER) as hung:
            with contextlib.suppress(ModuleError):  # failing startup is fine; hanging is not
                await engine.start_all()
        assert not hung.cancelled_caught, "start_all() never returned"


# -- review finding 8. Phases: stop_all racing startup, asks outliving the engine
# Regression: review 8: Phases: stop_all racing startup, asks outliving the engine
async def test_stop_all_during_init_all_keeps_the_ledger_stopped(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A SIGTERM handler calls stop_all while a slow init runs: once stop_all returned, the
    ledger must not go on to INITIALIZED/RUNNING and accept appends."""

    class SlowInit(Recorder):
        async def init(self, ctx: ModuleContext) -> None:
            await super().init(ctx)
            await trio.sleep(5)

    async with LedgerEngine(config()) as engine:
        engine.register(SlowInit("slow", []))

        async def initialize() -> None:
            with contextlib.suppress(LifecycleError, ModuleError):  # refusing is fine
                await engine.init_all()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(initialize)
            await trio.sleep(1)
            await engine.stop_all()
        assert engine.phase in (Phase.STOPPED, Phase.FAILED)
        with pytest.raises(LifecycleError, match="start_all needs INITIALIZED"):
            await engine.start_all()


# Regression: review 8: Phases: stop_all racing startup, asks outliving the engine
async def test_ask_pending_when_the_engine_closes_fails_instead_of_hanging(
    mock_clock: trio.testing.MockClock,
) -> None:
    outcome: list[BaseException] = []

    async def ask(handle: Any) -> None:
        try:
            await handle.ask(lambda m: m.id)
        except ModuleError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as outer:
        async with LedgerEngine(config()) as engine:
            handle = engine.register(Recorder("r", []))
            outer.start_soon(ask, handle)
            await settle()
        # The engine is closed: nothing will ever answer that ask.
        with trio.move_on_after(FOREVER):
            while not outcome:
                await trio.sleep(1)
        outer.cancel_scope.cancel()
    assert len(outcome) == 1
    assert "'r'" in str(outcome[0])


class SlowStorage(MemoryStorage):
    """A durable backend takes time per batch (SQLite fsyncs in a worker thread)."""

    async def append(self, batch: StorageBatch) -> None:
        await trio.sleep(0.1)
        await super().append(batch)


# Regression: review 8: Phases: stop_all racing startup, asks outliving the engine
async def test_stop_all_lets_queued_appends_finish_with_no_modules(
    mock_clock: trio.testing.MockClock,
) -> None:
    """stop_all "lets the appends already in flight finish". With no module registered (or
    all with shutdown=0) the bound is 0 s: an append queued behind a batch being written is
    failed although nothing is stuck."""
    async with open_ledger(config(), storage=SlowStorage()) as engine:
        seqs: list[int] = []

        async def appender(n: int) -> None:
            seqs.append((await engine.append(Record("k", n))).seq)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(appender, 0)
            await trio.sleep(0.05)  # batch 0 is being written
            nursery.start_soon(appender, 1)  # queued behind it: in flight
            await trio.testing.wait_all_tasks_blocked()
            await engine.stop_all()
        assert sorted(seqs) == [0, 1]


# Regression: review 8: Phases: stop_all racing startup, asks outliving the engine
async def test_ask_interrupted_by_a_crash_carries_the_crash_as_cause(
    mock_clock: trio.testing.MockClock,
) -> None:
    """ask's docstring: ModuleError when the module "crashed ... while answering (then
    `__cause__` is the crash)". A background task fails while an ask runs."""

    class Busy(Module):
        id = "busy"

        async def start(self, ctx: ModuleContext) -> None:
            async def fail_soon() -> None:
                await trio.sleep(1)
                raise OSError("lost the connection")

            ctx.spawn(fail_soon)

        async def wait(self, seconds: float) -> None:
            await trio.sleep(seconds)

    async with open_ledger(config(), modules=[Busy()]) as engine:
        handle = engine.modules.get(Busy)
        with pytest.raises(ModuleError, match="busy") as info:
            await handle.ask(Busy.wait, 5.0)
        assert isinstance(info.value.__cause__, OSError)


class CrashesAtTwo(Module):
    """Background work fails at t+2 s, exactly when an ask started at t times out."""

    id = "busy"

    async def start(self, ctx: ModuleContext) -> None:
        async def fail_at_two() -> None:
            await trio.sleep(2)
            raise OSError("lost the connection")

        ctx.spawn(fail_at_two)

    async def wait(self) -> None:
        await trio.sleep_forever()


# Regression: review 8: Phases: stop_all racing startup, asks outliving the engine
async def test_ask_is_answered_when_its_timeout_and_a_crash_coincide(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Both cancellations land in one scheduler batch; trio shuffles batches, so the losing
    order shows up about half the time: 20 rounds make a miss practically certain."""
    hung = 0
    for _ in range(20):
        spec = ModuleSpec(CrashesAtTwo(), timeout=2.0, restart=Restart.TEMPORARY)
        async with open_ledger(config(), modules=[spec]) as engine:
            handle = engine.modules.get(CrashesAtTwo)
            with trio.move_on_after(FOREVER) as scope:
                with pytest.raises(ModuleError, match="busy"):
                    await handle.ask(CrashesAtTwo.wait)
            hung += scope.cancelled_caught
    assert hung == 0


# -- review finding 9: closed before init
# Regression: review 9: an engine closed before init_all ends STOPPED
async def test_an_engine_closed_before_init_ends_stopped() -> None:
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("r", []))
    assert engine.phase is Phase.STOPPED
