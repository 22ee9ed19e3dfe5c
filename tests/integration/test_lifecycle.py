"""Lifecycle: ordering, depends_on, rollback, wrong-phase errors, registry rules."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel

from nucleus_actors import (
    LedgerConfig,
    LedgerEngine,
    LifecycleError,
    Module,
    ModuleError,
    ModuleSpec,
    ModuleState,
    Phase,
    Record,
    RegistryError,
    open_ledger,
)
from tests.conftest import Gate, Recorder, lifecycle

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
