"""Structured stop: drain, reverse order, deadlines, outside cancellation, in-flight appends."""

from __future__ import annotations

import contextlib
import signal
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Backoff,
    CommitUnknown,
    Hash,
    LedgerConfig,
    LedgerEngine,
    LifecycleError,
    Module,
    ModuleContext,
    ModuleError,
    ModuleState,
    Phase,
    Record,
    StorageError,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, StorageBatch
from tests.conftest import FOREVER, Gate, Recorder, lifecycle, settle

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


# -- review finding 4. stop_all: cancellation and hangs before the modules are reached
# Regression: review 4: stop_all: cancellation and hangs before the modules are reached
async def test_cancelled_stop_all_during_the_drain_still_ends_every_module(
    mock_clock: trio.testing.MockClock,
) -> None:
    """stop_all's docstring: when cancelled, the modules not stopped yet are cancelled at once
    and the ledger ends STOPPED. Cancel it while an in-flight append is being drained."""
    release = trio.Event()

    class Hold(Module):
        id = "hold"

        async def before_append(self, record: Record) -> Record | None:
            await release.wait()
            return None

    async with open_ledger(config(), modules=[Hold(), Recorder("probe", [])]) as engine:
        async with trio.open_nursery() as nursery:

            async def appender() -> None:
                with pytest.raises(LifecycleError):
                    await engine.append(Record("k", 1))

            nursery.start_soon(appender)
            await settle()
            with trio.move_on_after(1):
                await engine.stop_all()  # cancelled while waiting for the append to drain
            release.set()
        assert engine.phase is Phase.STOPPED
        assert [h.state for h in engine.modules] == [ModuleState.STOPPED] * 2


# Regression: review 4: stop_all: cancellation and hangs before the modules are reached
async def test_stop_all_finishes_a_validators_restart_instead_of_hanging(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A validator crashed and waits out its backoff; an append waits for it. stop_all must not
    hold forever on it: as an OTP supervisor finishes the restart it is handling before it
    shuts down, the restart completes at once (no backoff wait), the append goes through,
    then everything is drained and stopped."""
    gate = Gate("gate", [], fail={"before": lambda n, _: n == 1})
    async with open_ledger(config(backoff=Backoff(initial=10.0))) as engine:
        await engine.add(gate, shutdown=None)
        with pytest.raises(ModuleError, match="crashed in before_append"):
            await engine.append(Record("k", 1))
        receipts: list[int] = []

        async def appender() -> None:
            receipts.append((await engine.append(Record("k", 2))).seq)  # waits for the restart

        async with trio.open_nursery() as nursery:
            nursery.start_soon(appender)
            await settle()
            start = trio.current_time()
            with trio.move_on_after(FOREVER) as hung:
                await engine.stop_all()
        assert not hung.cancelled_caught, "stop_all never returned"
        assert trio.current_time() - start < 10.0  # the backoff was not waited out
        assert receipts == [0]
        assert engine.modules.get("gate").status.stop_result == "clean"


# Regression: review 4: stop_all: cancellation and hangs before the modules are reached
async def test_stop_all_does_not_hang_on_a_full_sink_left_restarting(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Same hole with a BLOCK sink: it crashed, waits out its backoff with a full inbox, and
    the pipeline waits for room. Once supervision stops, nothing will ever drain it."""
    sink = Recorder("sink", [], fail={"after": lambda n, _: n == 1})
    async with open_ledger(config(backoff=Backoff(initial=10.0))) as engine:
        handle = await engine.add(sink, inbox=2, shutdown=None)
        await engine.append(Record("k", 0))  # crashes on it: RESTARTING for 10 s
        await handle.wait_state(ModuleState.RESTARTING)
        await engine.append(Record("k", 1))  # inbox full: the redelivery of 0, and 1

        async def appender() -> None:
            with contextlib.suppress(LifecycleError):
                await engine.append(Record("k", 2))  # stored, then waits for room

        async with trio.open_nursery() as nursery:
            nursery.start_soon(appender)
            await settle()
            with trio.move_on_after(FOREVER) as hung:
                await engine.stop_all()
            nursery.cancel_scope.cancel()
        assert not hung.cancelled_caught, "stop_all never returned"


# Regression: review 4: stop_all: cancellation and hangs before the modules are reached
async def test_stop_all_delivers_a_stored_in_flight_append_to_every_healthy_module(
    mock_clock: trio.testing.MockClock,
) -> None:
    """stop_all: appends in flight "complete fully (stored and delivered) or fail with no
    trace". A slow BLOCK module (start order first) holds the pipeline past the drain bound;
    the healthy module after it is stopped first and never gets the stored record."""

    class Slow(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await trio.sleep(10)
            await super().after_append(record, hash)

    probe = Recorder("probe", [])
    async with LedgerEngine(config()) as engine:
        engine.register(Slow("slow", []), inbox=1, shutdown=1.0, timeout=None)
        engine.register(probe)
        await engine.init_all()
        await engine.start_all()
        await engine.append(Record("k", 0))  # slow is busy with it for 10 s
        receipts: list[int] = []

        async def appender() -> None:
            receipts.append((await engine.append(Record("k", 1))).seq)  # stored, then blocks

        async with trio.open_nursery() as nursery:
            nursery.start_soon(appender)
            await settle()
            await engine.stop_all()
        assert receipts == [1]  # the caller was told it committed ...
        assert probe.seen == [0, 1]  # ... so the healthy module must have received it


# -- review finding 5. Background work returning while `stop` runs
class FlushingWorker(Module):
    """The usual shape: `stop` tells the worker to finish, then closes its connection."""

    id = "worker"

    def __init__(self) -> None:
        self.stops = 0
        self.closed = False

    async def start(self, ctx: ModuleContext) -> None:
        self.quit = trio.Event()
        ctx.spawn(self.work)

    async def work(self) -> None:
        await self.quit.wait()  # then returns: its job is over

    async def stop(self, ctx: ModuleContext) -> None:
        self.stops += 1
        self.quit.set()
        await trio.sleep(1)  # close the connection
        self.closed = True


# Regression: review 5: Background work returning while `stop` runs
async def test_worker_returning_during_stop_does_not_cancel_or_repeat_stop(
    mock_clock: trio.testing.MockClock,
) -> None:
    worker = FlushingWorker()
    async with open_ledger(config(), modules=[worker]) as engine:
        await engine.stop_all()
        status = engine.modules.get("worker").status
    assert worker.closed
    assert worker.stops == 1
    assert status.stop_result == "clean"


# -- chaos bug B3
class UnsureStorage(MemoryStorage):
    """Stores the 2nd batch, then raises; right after, its head cannot be read either."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.head_broken = False

    async def append(self, batch: StorageBatch) -> None:
        self.batches += 1
        await super().append(batch)
        if self.batches == 2:
            self.head_broken = True
            raise StorageError("disk said no (after writing)")

    async def head(self) -> tuple[int, Hash]:
        if self.head_broken:
            self.head_broken = False
            raise StorageError("head unreadable")
        return await super().head()


class Seen(Module):
    id = "seen"

    def __init__(self) -> None:
        self.seqs: list[int | None] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.seqs.append(record.seq)


# Regression: chaos bug B3: an adopted entry of unknown storage outcome was never delivered
async def test_b3_an_adopted_entry_is_delivered(mock_clock: trio.testing.MockClock) -> None:
    seen = Seen()
    async with open_ledger(
        LedgerConfig(ledger_id="t"), storage=UnsureStorage(), modules=[seen]
    ) as engine:
        await engine.append(Record("k", 0))
        with pytest.raises(CommitUnknown, match="storage could not tell whether it was stored"):
            await engine.append(Record("k", 1))  # it did land
        third = await engine.append(Record("k", 2))
        assert third.seq == 2  # seq 1 was adopted into the chain
    assert seen.seqs == [0, 1, 2]  # fails: [0, 2]


# -- chaos bug B5
# Regression: chaos bug B5: a landed entry of unknown outcome was lost if the ledger stopped first
async def test_b5_a_landed_entry_of_unknown_outcome_is_delivered_before_the_stop(
    mock_clock: trio.testing.MockClock,
) -> None:
    seen = Seen()
    storage = UnsureStorage()
    async with open_ledger(LedgerConfig(ledger_id="t"), storage=storage, modules=[seen]) as engine:
        await engine.append(Record("k", 0))
        with pytest.raises(CommitUnknown, match="storage could not tell whether it was stored"):
            await engine.append(Record("k", 1))  # it did land; no append follows
    async with LedgerEngine(LedgerConfig(ledger_id="t"), storage) as reopened:
        assert reopened.state.length == 2  # it landed
    assert seen.seqs == [0, 1]  # fails: [0]
    assert engine.state.length == 2  # fails: 1


class _Stuck(Module):
    """Hangs in whichever callbacks `hang` names (until cancelled)."""

    def __init__(self, module_id: str, *hang: str) -> None:
        self.id = module_id
        self.hang = hang

    async def before_append(self, record: Record) -> Record | None:
        if "before" in self.hang:
            await trio.sleep_forever()
        return record

    async def after_append(self, record: Record, hash: Hash) -> None:
        if "after" in self.hang:
            await trio.sleep_forever()

    async def stop(self, ctx: ModuleContext) -> None:
        if "stop" in self.hang:
            await trio.sleep_forever()


@pytest.mark.parametrize("stuck_in", ["before", "after"])
async def test_stop_all_takes_at_most_the_longest_shutdown_plus_the_sum_of_shutdowns(
    mock_clock: trio.testing.MockClock, stuck_in: str
) -> None:
    """The bound docs/daemon.md gives systemd's TimeoutStopSec (graceful_timeout aside): a
    ledger stops within its longest module `shutdown` (in-flight appends stuck on a module)
    plus the sum of its modules' `shutdown` (each drains and stops in turn), plus the longest
    once more if a restart round is running. Every module here overstays everything."""
    shutdowns = {"a": 1.0, "b": 2.0, "c": 4.0}
    async with open_ledger(config()) as engine:
        for name, shutdown in shutdowns.items():
            hang = (stuck_in, "stop") if name == "a" else ("stop",)
            await engine.add(_Stuck(name, *hang), shutdown=shutdown)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_append_ignoring_errors, engine)  # in flight, stuck on "a"
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()
            await engine.stop_all()
        took = trio.current_time() - started
    longest, total = max(shutdowns.values()), sum(shutdowns.values())
    # Stuck before_append: the drain waits `longest` for progress, then every module its own
    # deadline. Stuck after_append: the drain finishes at once (the record is stored), and
    # "a" spends its deadline on the undelivered record and its stop together.
    assert took == pytest.approx(longest + total if stuck_in == "before" else total)
    assert took <= 2 * longest + total  # the documented bound
    for name in shutdowns:
        assert engine.modules.get(name).status.state is ModuleState.STOPPED


async def _append_ignoring_errors(engine: LedgerEngine) -> None:
    with contextlib.suppress(LifecycleError, ModuleError):
        await engine.append(Record("k", 1))
