"""Adversarial review of the runtime core: each test states what the contract promises.

Each test demonstrated a confirmed defect (it failed on the code as it was, marked
`xfail(strict=True)` by `defect(...)`); the markers were dropped as the fixes landed. Mark a newly
found defect the same way until it is fixed.
Every wait that could hang is bounded with a MockClock deadline, so a hang fails fast.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Backoff,
    Hash,
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    LifecycleError,
    Module,
    ModuleContext,
    ModuleError,
    ModuleSpec,
    ModuleState,
    NucleusError,
    Phase,
    Record,
    Restart,
    StorageError,
    Strategy,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, StorageBatch
from tests.conftest import Gate, Recorder

Log = list[tuple[str, str, Any]]

# Far beyond any deadline used below: reaching it means "hung forever" (MockClock autojumps).
FOREVER = 1000.0


def defect(reason: str) -> pytest.MarkDecorator:
    """A confirmed defect: the test fails on the current code (strict xfail)."""
    return pytest.mark.xfail(strict=True, reason=reason)


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="review", **kw)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# -- 1. A crash or exit while init/start runs never answers the lifecycle request ---------------


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


# -- 2. Cancelling terminate() leaves a dead module that is neither STOPPED nor shut ------------


class SlowStopGate(Gate):
    async def stop(self, ctx: ModuleContext) -> None:
        await super().stop(ctx)
        await trio.sleep(3)


async def test_cancelled_terminate_leaves_appends_fail_closed_not_hung(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with open_ledger(config()) as engine:
        handle = await engine.add(SlowStopGate("gate", []), shutdown=10.0)
        with trio.move_on_after(1):
            await engine.terminate("gate")  # cancelled while `stop` runs
        await trio.sleep(5)  # its stop has long finished: the actor is gone
        with pytest.raises(ModuleError, match="gate"), trio.fail_after(FOREVER):
            await engine.append(Record("k", 1))  # fail-closed, not hung
        assert handle.state is ModuleState.STOPPED


# -- 3. A group member killed during a group restart keeps a stale `stop` in its inbox ----------


async def test_group_member_killed_while_stopping_runs_again_after_the_restart(
    mock_clock: trio.testing.MockClock,
) -> None:
    class SlowSink(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await trio.sleep(3)  # longer than its shutdown: the group restart kills it
            await super().after_append(record, hash)

    log: Log = []
    async with LedgerEngine(config(strategy=Strategy.ONE_FOR_ALL)) as engine:
        slow = engine.register(SlowSink("slow", log), shutdown=1.0, timeout=None)
        engine.register(Recorder("bad", log, fail={"after": lambda n, _: n == 1}))
        await engine.init_all()
        await engine.start_all()
        await engine.append(Record("k", 1))  # "bad" crashes -> ONE_FOR_ALL restart
        await slow.wait_state(ModuleState.RESTARTING)
        await slow.wait_state(ModuleState.RUNNING)
        await trio.sleep(10)  # the redelivered record is processed
        assert slow.state is ModuleState.RUNNING
        with trio.fail_after(FOREVER):  # a RUNNING module answers
            assert await slow.ask(lambda m: m.seen) == [0]


# -- 4. stop_all: cancellation and hangs before the modules are reached -------------------------


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


# -- 5. Background work returning while `stop` runs --------------------------------------------


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


# -- 6. Supervision ----------------------------------------------------------------------------


async def test_backoff_grows_while_restarts_keep_failing(
    mock_clock: trio.testing.MockClock,
) -> None:
    """k counts consecutive restarts and resets only after the module *stayed RUNNING* for
    reset_after. Here it ran long once, then every restart's start fails: it never runs again,
    so the delays must grow 1, 2, 4, 8 (they stay at 1: `running_since` is never cleared)."""
    starts: list[float] = []

    class Flaky(Recorder):
        async def start(self, ctx: ModuleContext) -> None:
            starts.append(trio.current_time())
            await super().start(ctx)

    flaky = Flaky("flaky", [], fail={"after": lambda n, _: True, "start": lambda n, _: n > 1})
    backoff = Backoff(initial=1.0, multiplier=2.0, max=100.0, reset_after=10.0)
    cfg = config(backoff=backoff, max_restarts=4, restart_window=1000.0)
    with pytest.raises(LedgerFailed):
        async with open_ledger(cfg, modules=[flaky]) as engine:
            await trio.sleep(50)  # RUNNING well past reset_after
            await engine.append(Record("k", 1))  # crash; then every restart's start fails
            await trio.sleep_forever()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(starts[1:])]
    assert gaps == [2.0, 4.0, 8.0]  # delays before restarts k = 1, 2, 3


async def test_escalation_surfaces_as_ledger_failed_even_if_an_append_fails_first(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Escalation should cancel the body, then the block raises LedgerFailed. Escalation
    stops the modules first, so an append in flight fails with LifecycleError ("ledger is
    FAILED") before the body is cancelled; that error escapes and LedgerFailed is lost."""

    class SlowGate(Gate):
        async def before_append(self, record: Record) -> Record | None:
            await trio.sleep(1)
            return await super().before_append(record)

    modules = [SlowGate("gate", []), Recorder("crashy", [], fail={"after": lambda n, _: True})]
    with pytest.raises(LedgerFailed, match="more than 0 restarts"):
        async with open_ledger(config(max_restarts=0), modules=modules) as engine:
            await engine.append(Record("k", 1))  # "crashy" crashes on it: escalation
            await engine.append(Record("k", 2))  # in the gate when the ledger fails
            await trio.sleep_forever()


# -- 7. Errors at the public boundary ----------------------------------------------------------


def flaky_wall_clock() -> Any:
    """A wall clock that fails on its 2nd reading (as a clock behind a syscall could)."""
    calls = 0

    def clock() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("clock unavailable")
        return 1_000_000 * calls

    return clock


async def test_a_failing_wall_clock_fails_that_append_like_a_bad_reading() -> None:
    """A wall_clock returning a bad value fails the append with NucleusError and the ledger
    goes on; one that raises kills the pipeline task and the whole ledger instead."""
    async with open_ledger(config(wall_clock=flaky_wall_clock())) as engine:
        await engine.append(Record("k", 1))
        with pytest.raises(NucleusError, match="wall_clock"):
            await engine.append(Record("k", 2))
        assert (await engine.append(Record("k", 3))).seq == 1


async def test_an_internal_task_failure_is_not_an_exception_group_at_the_boundary() -> None:
    raised: list[BaseException] = []
    try:
        async with open_ledger(config(wall_clock=flaky_wall_clock())) as engine:
            await engine.append(Record("k", 1))
            await engine.append(Record("k", 2))
    except BaseException as exc:  # what the embedder sees
        raised.append(exc)
    assert len(raised) == 1
    assert isinstance(raised[0], NucleusError), repr(raised[0])


# -- 8. Phases: stop_all racing startup, asks outliving the engine ------------------------------


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


# -- 9. Suspected in the review, closed afterwards ---------------------------------------------


class LyingStorage(MemoryStorage):
    """Stores the batch, then fails, and cannot even report its head once (a lost ack)."""

    def __init__(self) -> None:
        super().__init__()
        self.lie_on = -1
        self.head_fails = False

    async def append(self, batch: StorageBatch) -> None:
        await super().append(batch)
        if batch.entries[0].seq == self.lie_on:
            self.head_fails = True
            raise StorageError("connection reset after commit")

    async def head(self) -> Any:
        if self.head_fails:
            self.head_fails = False
            raise StorageError("connection still down")
        return await super().head()


async def test_storage_outcome_unknown_is_said_and_the_chain_resyncs() -> None:
    storage = LyingStorage()
    async with open_ledger(config(), storage=storage) as engine:
        await engine.append(Record("k", 0))
        storage.lie_on = 1
        with pytest.raises(StorageError, match=r"could not tell whether it was stored"):
            await engine.append(Record("k", 1))
        # The batch did land: the next append continues after it instead of colliding.
        receipt = await engine.append(Record("k", 2))
        assert receipt.seq == 2
        assert [e.record.payload async for e in engine.read()] == [0, 1, 2]
        assert await engine.verify() == receipt.hash


async def test_restart_exactly_window_old_still_counts(mock_clock: trio.testing.MockClock) -> None:
    """OTP keeps a restart R while R >= Now - Period: two restarts exactly `restart_window`
    apart are both inside the window, so with max_restarts=1 the second escalates."""
    failed: set[int] = set()

    def first_time(n: int, seq: int) -> bool:
        fresh = seq not in failed
        failed.add(seq)
        return fresh

    flaky = Recorder("flaky", [], fail={"after": first_time})
    with pytest.raises(LedgerFailed):
        async with open_ledger(config(max_restarts=1, restart_window=5.0), modules=[flaky]) as e:
            first = trio.current_time()
            await e.append(Record("k", 1))  # crash and restart, both at `first`
            await e.modules.get("flaky").wait_state(ModuleState.RESTARTING)
            await e.modules.get("flaky").wait_state(ModuleState.RUNNING)
            await trio.sleep_until(first + 5.0)
            await e.append(Record("k", 2))  # second crash exactly one window later
            await trio.sleep(1)
            pytest.fail("the second restart, exactly restart_window later, did not escalate")


async def test_an_engine_closed_before_init_ends_stopped() -> None:
    async with LedgerEngine(config()) as engine:
        engine.register(Recorder("r", []))
    assert engine.phase is Phase.STOPPED
