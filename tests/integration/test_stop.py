"""Structured stop: drain, reverse order, deadlines, outside cancellation, in-flight appends."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Hash,
    LedgerConfig,
    LedgerEngine,
    LifecycleError,
    Module,
    ModuleContext,
    ModuleState,
    Phase,
    Record,
    open_ledger,
)
from tests.conftest import Recorder, lifecycle

Log = list[tuple[str, str, Any]]


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="test", **kw)


class SlowSink(Recorder):
    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(1)
        await super().after_append(record, hash)


async def test_stop_all_drains_inboxes_before_stop(mock_clock: trio.testing.MockClock) -> None:
    log: Log = []
    async with open_ledger(config()) as engine:
        await engine.add(SlowSink("sink", log), inbox=16, shutdown=None)
        for n in range(10):
            await engine.append(Record("k", n))
        assert engine.modules.get("sink").status.inbox_depth == 10
        await engine.stop_all()
        assert engine.modules.get("sink").status.processed == 10
    events = [(e, d) for _, e, d in log if e in ("after", "stop")]
    assert events == [*[("after", n) for n in range(10)], ("stop", None)]


async def test_stop_refuses_new_appends_and_finishes_in_flight() -> None:
    release = trio.Event()

    class Hold(Module):
        id = "hold"

        async def before_append(self, record: Record) -> Record | None:
            await release.wait()
            return None

    async with open_ledger(config(), modules=[Hold(), Recorder("probe", [])]) as engine:
        results: list[object] = []

        async def appender(n: int) -> None:
            results.append((await engine.append(Record("k", n))).seq)

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(appender, n)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(engine.stop_all)
            await trio.testing.wait_all_tasks_blocked()
            assert engine.phase is Phase.STOPPING
            with pytest.raises(LifecycleError, match=r"is STOPPING \(append needs RUNNING\)"):
                await engine.append(Record("k", 99))
            release.set()
        assert sorted(results) == [0, 1, 2]  # in flight: completed fully
        assert engine.phase is Phase.STOPPED
        assert engine.modules.get("probe").status.processed == 3  # and delivered
        assert await engine.verify() == engine.state.head


class HangInStop(Recorder):
    async def stop(self, ctx: ModuleContext) -> None:
        await super().stop(ctx)
        await trio.sleep_forever()


async def test_hung_stop_is_cancelled_after_shutdown(mock_clock: trio.testing.MockClock) -> None:
    log: Log = []
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("a", log))
        engine.register(HangInStop("hang", log), shutdown=3.0)
        await engine.init_all()
        await engine.start_all()
        start = trio.current_time()
        await engine.stop_all()
        assert trio.current_time() - start == pytest.approx(3.0)
        status = {s.id: s for s in engine.modules.status()}
        assert status["hang"].stop_result == "cancelled"
        assert status["hang"].state is ModuleState.STOPPED
        assert status["a"].stop_result == "clean"
    assert [m for m, e in lifecycle(log) if e == "stop"] == ["hang", "a"]


async def test_shutdown_zero_cancels_without_calling_stop() -> None:
    log: Log = []
    async with open_ledger(config()) as engine:
        await engine.add(Recorder("brutal", log), shutdown=0)
    assert ("brutal", "stop") not in lifecycle(log)
    assert engine.modules.get("brutal").status.stop_result == "cancelled"


async def test_hung_hook_during_stop_is_bounded(mock_clock: trio.testing.MockClock) -> None:
    class Stuck(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await trio.sleep_forever()

    async with open_ledger(config()) as engine:
        await engine.add(Stuck("stuck", []), timeout=None, shutdown=2.0, inbox=1)
        await engine.append(Record("k", 1))
        start = trio.current_time()
        await engine.stop_all()
        assert trio.current_time() - start <= 4.0  # drain bound + stop deadline
        assert engine.modules.get("stuck").status.stop_result == "cancelled"
        assert await engine.verify() == engine.state.head


async def test_cancel_from_outside_stops_modules(mock_clock: trio.testing.MockClock) -> None:
    log: Log = []
    with trio.move_on_after(5) as scope:
        async with open_ledger(config(), modules=[Recorder("a", log), Recorder("b", log)]) as e:
            await e.append(Record("k", 1))
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert [m for m, ev in lifecycle(log) if ev == "stop"] == ["b", "a"]


async def test_exit_timeout_caps_unbounded_shutdown_on_cancel(
    mock_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    with trio.move_on_after(1):
        async with open_ledger(config(exit_timeout=7.0)) as engine:
            await engine.add(HangInStop("hang", log), shutdown=None)
            await trio.sleep_forever()
    # cancelled at t=1, then stop_all capped at exit_timeout=7
    assert trio.current_time() == pytest.approx(8.0)
    assert engine.modules.get("hang").status.stop_result == "cancelled"


async def test_keyboard_interrupt_in_body_stops_modules() -> None:
    log: Log = []
    with pytest.raises(KeyboardInterrupt):
        async with open_ledger(config(), modules=[Recorder("a", log)]):
            raise KeyboardInterrupt
    assert ("a", "stop") in lifecycle(log)


def test_sigint_during_run_stops_modules_and_raises_keyboardinterrupt() -> None:
    log: Log = []

    async def main() -> None:
        async with open_ledger(config(), modules=[Recorder("a", log)]) as engine:
            await engine.append(Record("k", 1))
            signal.raise_signal(signal.SIGINT)
            await trio.sleep_forever()

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert ("a", "stop") in lifecycle(log)


async def test_cancelling_stop_all_kills_the_rest(mock_clock: trio.testing.MockClock) -> None:
    log: Log = []
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("a", log))
        engine.register(HangInStop("hang", log), shutdown=None)
        await engine.init_all()
        await engine.start_all()
        with trio.move_on_after(1):
            await engine.stop_all()
        assert engine.phase is Phase.STOPPED
        assert [h.state for h in engine.modules] == [ModuleState.STOPPED] * 2
        assert engine.modules.get("hang").status.stop_result == "cancelled"
    assert ("a", "stop") not in lifecycle(log)  # killed, not stopped


async def test_crash_during_stop_all_restarts_nothing() -> None:
    class CrashOnDrain(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await engine.wait_phase(Phase.STOPPING)
            raise RuntimeError("crash while draining")

    async with open_ledger(config()) as engine:
        await engine.add(CrashOnDrain("c", []))
        await engine.add(Recorder("r", []))
        await engine.append(Record("k", 1))
        await engine.stop_all()
    status = {s.id: s for s in engine.modules.status()}
    assert status["c"].state is ModuleState.FAILED
    assert status["c"].restarts == 0
    assert engine.statistics().restarts == 0
