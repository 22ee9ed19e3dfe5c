"""Supervision: restart types, strategies, intensity, backoff, redelivery, dynamic control."""

from __future__ import annotations

import itertools
import random
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
    ModuleState,
    Overflow,
    Phase,
    Record,
    RegistryError,
    Restart,
    Strategy,
    open_ledger,
)
from tests.conftest import FOREVER, Gate, Recorder, lifecycle, settle

Log = list[tuple[str, str, Any]]


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="test", **kw)


async def test_issue_example_start_called_four_times_then_ledger_failed(
    mock_clock: trio.testing.MockClock,
) -> None:
    """max_restarts=3; start ok once; after_append crashes; every restart's start raises."""
    log: Log = []
    flaky = Recorder(
        "flaky",
        log,
        fail={"after": lambda n, _: True, "start": lambda n, _: n > 1},
    )
    with pytest.raises(LedgerFailed, match=r"more than 3 restarts within 5.0 s") as info:
        async with open_ledger(config(max_restarts=3), modules=[flaky]) as engine:
            await engine.append(Record("k", 1))
            await trio.sleep_forever()
    assert flaky.calls["start"] == 4
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "fails in start (call 4)" in str(info.value.__cause__)
    assert engine.phase is Phase.FAILED
    assert engine.modules.get("flaky").state is ModuleState.FAILED
    with pytest.raises(LifecycleError, match="is FAILED"):
        await engine.append(Record("k", 2))


async def test_restarts_spaced_wider_than_the_window_never_escalate(
    mock_clock: trio.testing.MockClock,
) -> None:
    failed: set[int] = set()

    def first_time(n: int, seq: int) -> bool:  # crash once per record, not on redelivery
        fresh = seq not in failed
        failed.add(seq)
        return fresh

    flaky = Recorder("flaky", [], fail={"after": first_time})
    async with open_ledger(config(max_restarts=2, restart_window=5.0), modules=[flaky]) as engine:
        for n in range(8):
            await engine.append(Record("k", n))
            await settle()
            await trio.sleep(6)  # each crash falls outside the window of the previous ones
        assert engine.modules.get("flaky").status.restarts == 8
        assert engine.phase is Phase.RUNNING


async def test_intensity_is_counted_per_ledger(mock_clock: trio.testing.MockClock) -> None:
    """Crashes of different modules add up: OTP counts restarts per supervisor."""
    mods = [Recorder(f"m{i}", [], fail={"after": lambda n, _: n == 1}) for i in range(4)]
    with pytest.raises(LedgerFailed, match="last crash in module 'm"):
        async with open_ledger(config(max_restarts=3), modules=mods) as engine:
            await engine.append(Record("k", 1))  # each of the 4 crashes once
            await trio.sleep_forever()


async def test_escalation_stops_everything_in_reverse_and_is_bare(
    mock_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    a, b = Recorder("a", log), Recorder("b", log)
    bad = Recorder("bad", log, fail={"after": lambda n, _: True, "start": lambda n, _: n > 1})
    try:
        async with open_ledger(config(max_restarts=1), modules=[a, bad, b]) as engine:
            await engine.append(Record("k", 1))
            await trio.sleep_forever()
    except LedgerFailed as exc:
        failure: BaseException = exc
    assert type(failure) is LedgerFailed  # not an ExceptionGroup
    stops = [m for m, e in lifecycle(log) if e == "stop"]
    assert stops[-2:] == ["b", "a"]  # every module stopped in reverse order at escalation
    assert {h.id: h.state for h in engine.modules} == {
        "a": ModuleState.STOPPED,
        "bad": ModuleState.FAILED,
        "b": ModuleState.STOPPED,
    }


class Exiter(Recorder):
    """Calls ctx.exit() from after_append on the first delivery."""

    async def after_append(self, record: Record, hash: Hash) -> None:
        await super().after_append(record, hash)
        if self.calls["after"] == 1:
            self.ctx.exit()

    async def init(self, ctx: ModuleContext) -> None:
        self.ctx = ctx
        await super().init(ctx)


@pytest.mark.parametrize(
    ("restart", "outcome", "restarted", "state"),
    [
        (Restart.PERMANENT, "crash", True, ModuleState.RUNNING),
        (Restart.PERMANENT, "exit", True, ModuleState.RUNNING),
        (Restart.TRANSIENT, "crash", True, ModuleState.RUNNING),
        (Restart.TRANSIENT, "exit", False, ModuleState.STOPPED),
        (Restart.TEMPORARY, "crash", False, ModuleState.FAILED),
        (Restart.TEMPORARY, "exit", False, ModuleState.STOPPED),
    ],
)
async def test_restart_types(
    restart: Restart, outcome: str, restarted: bool, state: ModuleState
) -> None:
    log: Log = []
    if outcome == "crash":
        module: Recorder = Recorder("m", log, fail={"after": lambda n, _: n == 1})
    else:
        module = Exiter("m", log)
    async with open_ledger(config()) as engine:
        handle = await engine.add(module, restart=restart)
        await engine.append(Record("k", 1))
        await settle()
        assert handle.state is state
        assert handle.status.restarts == (1 if restarted else 0)
        assert handle.status.stop_result == ("exited" if outcome == "exit" else None)
        assert engine.phase is Phase.RUNNING  # the ledger goes on either way
        assert (await engine.append(Record("k", 2))).seq == 1


async def test_crash_in_background_work_and_normal_return(
    mock_clock: trio.testing.MockClock,
) -> None:
    class Worker(Module):
        id = "worker"

        def __init__(self, fail: bool) -> None:
            self.fail = fail

        async def start(self, ctx: ModuleContext) -> None:
            async def work() -> None:
                await trio.sleep(1)
                if self.fail:
                    raise OSError("lost the connection")

            ctx.spawn(work)

    async with open_ledger(config()) as engine:
        crashing = await engine.add(Worker(fail=True), restart=Restart.TEMPORARY)
        await trio.sleep(2)
        assert crashing.state is ModuleState.FAILED
        assert "OSError('lost the connection')" in (crashing.status.last_error or "")
    async with open_ledger(config()) as engine:
        finishing = await engine.add(Worker(fail=False), restart=Restart.TRANSIENT)
        await trio.sleep(2)
        assert finishing.state is ModuleState.STOPPED
        assert finishing.status.stop_result == "exited"


async def test_helper_task_may_finish_without_ending_the_module() -> None:
    class Helper(Module):
        id = "helper"
        done = False

        async def start(self, ctx: ModuleContext) -> None:
            async def once() -> None:
                self.done = True

            ctx.spawn(once, exit_on_return=False)

    async with open_ledger(config(), modules=[Helper()]) as engine:
        await settle()
        handle = engine.modules.get(Helper)
        assert await handle.ask(lambda m: m.done)
        assert handle.state is ModuleState.RUNNING


async def test_crashed_delivery_is_redelivered_first_and_inbox_waits() -> None:
    """The delivery a module crashed on goes to the new incarnation first; later ones wait."""
    made: list[Recorder] = []
    log: Log = []

    def factory() -> Recorder:
        module = Recorder("sink", log, fail={"after": lambda n, seq: not made[1:] and seq == 2})
        made.append(module)
        return module

    async with open_ledger(config()) as engine:
        handle = await engine.add(factory, inbox=8)
        for n in range(6):
            await engine.append(Record("k", n))
        await settle()
        assert len(made) == 2  # a fresh instance from the factory
        assert made[0].seen == [0, 1]
        assert made[1].seen == [2, 3, 4, 5]  # redelivery of 2 first, then the rest in order
        assert handle.status.incarnation == 2
        assert handle.status.processed == 6


async def test_factory_changing_id_on_restart_is_a_registry_error(
    mock_clock: trio.testing.MockClock,
) -> None:
    ids = iter(["same", "other", "other", "other", "other", "other"])

    def factory() -> Recorder:
        return Recorder(next(ids), [], fail={"after": lambda n, _: True})

    with pytest.raises(LedgerFailed) as info:
        async with open_ledger(config(max_restarts=2), modules=[factory]) as engine:
            await engine.append(Record("k", 1))
            await trio.sleep_forever()
    cause = info.value.__cause__
    assert isinstance(cause, RegistryError)
    assert "returned a module with id 'other': every incarnation must keep its id" in str(cause)


def _strategy_setup(log: Log) -> list[Module]:
    return [
        Recorder("a", log),
        Recorder("b", log, fail={"after": lambda n, _: n == 1}),
        Recorder("c", log),
        Recorder("d", log),
    ]


@pytest.mark.parametrize(
    ("strategy", "events"),
    [
        (Strategy.ONE_FOR_ONE, [("b", "stop"), ("b", "init"), ("b", "start")]),
        (
            Strategy.ONE_FOR_ALL,
            [
                ("b", "stop"),  # best-effort stop of the crashed one
                ("d", "stop"), ("c", "stop"), ("a", "stop"),  # the rest, in reverse
                ("a", "init"), ("a", "start"),  # all, in forward order
                ("b", "init"), ("b", "start"),
                ("c", "init"), ("c", "start"),
                ("d", "init"), ("d", "start"),
            ],
        ),
        (
            Strategy.REST_FOR_ONE,
            [
                ("b", "stop"),
                ("d", "stop"), ("c", "stop"),
                ("b", "init"), ("b", "start"),
                ("c", "init"), ("c", "start"),
                ("d", "init"), ("d", "start"),
            ],
        ),
    ],
)  # fmt: skip
async def test_strategies_stop_reverse_and_start_forward(
    strategy: Strategy, events: list[tuple[str, str]]
) -> None:
    log: Log = []
    async with open_ledger(config(strategy=strategy), modules=_strategy_setup(log)) as engine:
        mark = len(log)
        # Only b has after_append crash on its first delivery; everyone receives it.
        await engine.append(Record("k", 1))
        await settle()
        assert lifecycle(log[mark:]) == events
        restarted = [s.id for s in engine.modules.status() if s.restarts]
        assert restarted == sorted({m for m, e in events if e == "start"})
        assert engine.statistics().restarts == len(restarted)  # each member counts
        assert all(h.state is ModuleState.RUNNING for h in engine.modules)


async def test_group_restart_counts_once_toward_intensity() -> None:
    log: Log = []
    mods = _strategy_setup(log)
    async with open_ledger(config(strategy="one_for_all", max_restarts=1), modules=mods) as engine:
        await engine.append(Record("k", 1))
        await settle()
        assert engine.phase is Phase.RUNNING  # 4 module restarts, 1 toward intensity
        assert engine.statistics().restarts == 4


class _Trigger(Recorder):
    """Crashes (from its background work) when `fire` is asked."""

    async def start(self, ctx: ModuleContext) -> None:
        await super().start(ctx)
        self.go = trio.Event()
        ctx.spawn(self._crash_on_cue)

    async def _crash_on_cue(self) -> None:
        await self.go.wait()
        raise RuntimeError(f"{self.id} crashes on cue")

    def fire(self) -> None:
        self.go.set()


# Regression: issue 13 §1, a terminated validator stayed STOPPED through a group restart.
async def test_group_restart_starts_a_terminated_validator_counting_once(
    mock_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    cfg = config(strategy=Strategy.REST_FOR_ONE, max_restarts=1, restart_window=3600)
    async with LedgerEngine(cfg) as engine:
        src = engine.register(_Trigger("src", log))
        engine.register(Gate("gate", log))
        engine.register(Recorder("tail", log), restart=Restart.TRANSIENT)
        await engine.init_all()
        await engine.start_all()
        await engine.terminate("gate")
        # A STOPPED validator keeps appends failing closed ...
        with pytest.raises(ModuleError, match="'gate' is STOPPED"):
            await engine.append(Record("k", 0))
        # ... until something starts it again: src crashes, REST_FOR_ONE restarts all three.
        await src.ask(_Trigger.fire)
        await settle()
        states = {h.id: h.state for h in engine.modules}
        assert states == dict.fromkeys(("src", "gate", "tail"), ModuleState.RUNNING)
        # each started member +1; the round counted once toward intensity (max 1: no escalation)
        assert [s.restarts for s in engine.modules.status()] == [1, 1, 1]
        assert engine.statistics().restarts == 3
        assert engine.phase is Phase.RUNNING
        receipt = await engine.append(Record("k", 1))  # the gate runs again: appends pass
        assert receipt.seq == 0
        assert ("gate", "before", 1) in log


async def test_temporary_sibling_is_not_restarted_by_a_group(
    mock_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    async with LedgerEngine(config(strategy=Strategy.ONE_FOR_ALL)) as engine:
        engine.register(Recorder("temp", log), restart=Restart.TEMPORARY)
        engine.register(Recorder("bad", log, fail={"after": lambda n, _: n == 1}))
        await engine.init_all()
        await engine.start_all()
        await engine.append(Record("k", 1))
        await settle()
        states = {h.id: h.state for h in engine.modules}
        assert states == {"temp": ModuleState.STOPPED, "bad": ModuleState.RUNNING}


async def test_backoff_delays_follow_the_formula(mock_clock: trio.testing.MockClock) -> None:
    backoff = Backoff(initial=1.0, multiplier=2.0, max=5.0, jitter=0.5, reset_after=100.0,
                      rng=random.Random(7))  # fmt: skip
    expected_rng = random.Random(7)
    expected = [
        min(5.0, 1.0 * 2.0**k) * (1 + 0.5 * (2 * expected_rng.random() - 1)) for k in range(4)
    ]
    restarted_at: list[float] = []

    class Flaky(Recorder):
        async def start(self, ctx: ModuleContext) -> None:
            restarted_at.append(trio.current_time())
            await super().start(ctx)

    failed: set[int] = set()

    def first_time(n: int, seq: int) -> bool:  # crash once per record, not on redelivery
        fresh = seq not in failed
        failed.add(seq)
        return fresh

    flaky = Flaky("flaky", [], fail={"after": first_time})
    cfg = config(backoff=backoff, max_restarts=10, restart_window=1.0)
    async with open_ledger(cfg, modules=[flaky]) as engine:
        for n in range(4):
            crashed_at = trio.current_time()
            await engine.append(Record("k", n))
            await engine.modules.get("flaky").wait_state(ModuleState.RESTARTING)
            await engine.modules.get("flaky").wait_state(ModuleState.RUNNING)
            assert restarted_at[-1] - crashed_at == pytest.approx(expected[n])
        # The 5th crash comes after it stayed RUNNING past reset_after: k is back to 0.
        await trio.sleep(100)
        rng_after = random.Random(7)
        for _ in range(4):
            rng_after.random()
        reset_delay = 1.0 * (1 + 0.5 * (2 * rng_after.random() - 1))
        crashed_at = trio.current_time()
        await engine.append(Record("k", 9))
        await engine.modules.get("flaky").wait_state(ModuleState.RESTARTING)
        await engine.modules.get("flaky").wait_state(ModuleState.RUNNING)
        assert restarted_at[-1] - crashed_at == pytest.approx(reset_delay)


async def test_per_module_backoff_overrides_the_ledger(mock_clock: trio.testing.MockClock) -> None:
    flaky = Recorder("flaky", [], fail={"after": lambda n, _: n == 1})
    async with open_ledger(config(backoff=Backoff(initial=50.0))) as engine:
        handle = await engine.add(flaky, backoff=Backoff(initial=3.0))
        start = trio.current_time()
        await engine.append(Record("k", 1))
        await handle.wait_state(ModuleState.RESTARTING)
        await handle.wait_state(ModuleState.RUNNING)
        assert trio.current_time() - start == pytest.approx(3.0)


async def test_dynamic_control_and_misuse() -> None:
    log: Log = []
    async with open_ledger(config(), modules=[Recorder("a", log)]) as engine:
        handle = await engine.add(Recorder("late", log))
        assert [h.id for h in engine.modules] == ["a", "late"]
        with pytest.raises(RegistryError, match="module 'late' is already present"):
            await engine.add(Recorder("late", log))
        with pytest.raises(RegistryError, match="module 'ghost' not found"):
            await engine.terminate("ghost")
        with pytest.raises(RegistryError, match="cannot restart module 'late': it is running"):
            await engine.restart("late")
        with pytest.raises(RegistryError, match="cannot remove module 'late': it is running"):
            await engine.remove("late")
        await engine.terminate("late")
        assert handle.state is ModuleState.STOPPED
        assert handle.status.stop_result == "clean"
        with pytest.raises(ModuleError, match=r"cannot ask module 'late': it is STOPPED"):
            await handle.ask(lambda m: 1)
        await engine.restart("late")
        assert handle.state is ModuleState.RUNNING
        assert handle.status.restarts == 1
        assert engine.statistics().restarts == 1  # manual restarts count
        await engine.terminate("late")
        await engine.remove("late")
        assert "late" not in engine.modules
        with pytest.raises(RegistryError, match="module 'late' not found"):
            await engine.remove("late")
    # The added module is last in start order: first to stop.
    assert [m for m, e in lifecycle(log) if e == "stop"] == ["late", "late", "a"]


async def test_add_failure_keeps_nothing() -> None:
    log: Log = []
    async with open_ledger(config()) as engine:
        with pytest.raises(ModuleError, match=r"module 'bad' failed in start"):
            await engine.add(Recorder("bad", log, fail={"start": lambda n, _: True}))
        assert "bad" not in engine.modules
        assert (await engine.append(Record("k", 1))).seq == 0
    with pytest.raises(LifecycleError, match=r"add a module needs RUNNING"):
        await engine.add(Recorder("x", log))


@pytest.mark.parametrize("policy", [Overflow.DROP_OLDEST, Overflow.DROP_NEWEST])
async def test_drop_policies_never_block_and_count(policy: Overflow) -> None:
    release = trio.Event()

    class Stalled(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await release.wait()
            await super().after_append(record, hash)

    async with open_ledger(config()) as engine:
        handle = await engine.add(Stalled("s", []), inbox=3, overflow=policy, timeout=None)
        for n in range(10):
            await engine.append(Record("k", n))  # never blocks
        await trio.testing.wait_all_tasks_blocked()
        assert handle.status.dropped == 7
        release.set()
        await settle()
        seen = await handle.ask(lambda m: m.seen)
    # 0 is in progress when the inbox fills; DROP_OLDEST keeps the newest queued ones.
    assert seen == ([0, 8, 9] if policy is Overflow.DROP_OLDEST else [0, 1, 2])


async def test_fail_policy_crashes_the_module_not_the_append() -> None:
    release = trio.Event()

    class Stalled(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await release.wait()

    async with open_ledger(config()) as engine:
        handle = await engine.add(Stalled("s", []), inbox=2, overflow=Overflow.FAIL, timeout=None)
        for n in range(3):
            await engine.append(Record("k", n))  # the third overflows
        await settle()
        status = handle.status
        assert (status.dropped, status.crashes, status.restarts) == (1, 1, 1)
        assert "overflowed its inbox of 2 deliveries" in (status.last_error or "")
        assert engine.state.length == 3
        release.set()


async def test_status_snapshot_and_counts() -> None:
    async with open_ledger(config(), modules=[Recorder("a", []), Recorder("b", [])]) as engine:
        await engine.append(Record("k", 1))
        await engine.terminate("b")
        status = engine.modules.status()
        assert [s.id for s in status] == ["a", "b"]
        assert status[0].processed == 1
        counts = engine.modules.counts()
        assert (counts.specs, counts.running, counts.stopped, counts.failed) == (2, 1, 1, 0)
        stats = engine.statistics()
        assert (stats.appends, stats.rejects, stats.crashes, stats.restarts) == (1, 0, 0, 0)
        with pytest.raises(AttributeError):
            stats.appends = 5  # type: ignore[misc]


async def test_restart_waits_for_a_failed_module_to_finish_unwinding(
    mock_clock: trio.testing.MockClock,
) -> None:
    class SlowStop(Recorder):
        async def stop(self, ctx: ModuleContext) -> None:
            await super().stop(ctx)
            await trio.sleep(2)  # the best-effort stop after its crash takes a while

    log: Log = []
    async with open_ledger(config()) as engine:
        handle = await engine.add(
            SlowStop("slow", log, fail={"after": lambda n, _: n == 1}), restart="temporary"
        )
        await engine.append(Record("k", 1))
        await handle.wait_state(ModuleState.FAILED)
        await engine.restart("slow")  # waits for the unwinding stop, then starts it again
        assert handle.state is ModuleState.RUNNING
        assert handle.status.incarnation == 2


async def test_stop_all_finishes_a_restart_in_progress_within_the_shutdown_bound(
    mock_clock: trio.testing.MockClock,
) -> None:
    """stop_all lets a restart round complete (OTP), but a restart that cannot complete (its
    init hangs, with no timeout) holds it no longer than the longest module shutdown."""

    class HangsOnRestart(Recorder):
        async def init(self, ctx: ModuleContext) -> None:
            await super().init(ctx)
            if ctx.incarnation > 1:
                await trio.sleep_forever()

    log: Log = []
    module = HangsOnRestart("stuck", log, fail={"after": lambda n, _: n == 1})
    async with open_ledger(config()) as engine:
        handle = await engine.add(module, timeout=None, shutdown=3.0)
        await engine.append(Record("k", 1))
        await handle.wait_state(ModuleState.RESTARTING)
        start = trio.current_time()
        await engine.stop_all()
        assert trio.current_time() - start <= 3.0 + 3.0  # supervision bound + its stop bound
        assert handle.state in (ModuleState.FAILED, ModuleState.STOPPED)
        assert engine.phase is Phase.STOPPED


# -- review finding 2. Cancelling terminate() leaves a dead module that is neither STOPPED nor shut
class SlowStopGate(Gate):
    async def stop(self, ctx: ModuleContext) -> None:
        await super().stop(ctx)
        await trio.sleep(3)


# Regression: review 2: Cancelling terminate() leaves a dead module that is neither STOPPED nor shut
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


# -- review finding 3. A group member killed during a group restart keeps a stale `stop` in its
#   inbox
# Regression: review 3: A group member killed during a group restart keeps a stale `stop` in its...
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


# -- review finding 6. Supervision
# Regression: review 6: Supervision
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


# Regression: review 6: Supervision
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


# -- review finding 9: intensity window edge
# Regression: review 9: a restart exactly window-old still counts (OTP keeps R >= Now - Period)
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


# -- chaos bugs B1, B2, B4
class FailingRestart(Module):
    """A validator whose first restart fails in init."""

    id = "validator"

    def __init__(self) -> None:
        self.inits = 0

    async def init(self, ctx: ModuleContext) -> None:
        self.inits += 1
        if self.inits == 2:
            raise RuntimeError("init fails on the first restart")

    async def before_append(self, record: Record) -> Record | None:
        if record.payload == "boom":
            raise RuntimeError("crash")
        return None


# Regression: chaos bug B1: a stop queued for an ended incarnation stopped the next one at once
async def test_b1_a_failed_restart_does_not_leave_a_stop_for_the_next_incarnation(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[FailingRestart()]) as engine:
        with pytest.raises(ModuleError, match="crashed in before_append"):
            await engine.append(Record("k", "boom"))
        with trio.move_on_after(60) as scope:
            receipt = await engine.append(Record("k", 1))
        assert not scope.cancelled_caught, f"append hangs: {engine.modules.get('validator').status}"
        assert receipt.seq == 0


class Slow(Module):
    id = "slow"

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(10)  # longer than its shutdown: a group restart kills it


class CrashOnce(Module):
    id = "crash-once"
    crashed = False

    async def after_append(self, record: Record, hash: Hash) -> None:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("crash once")


# Regression: chaos bug B1: a stop queued for an ended incarnation stopped the next one at once
async def test_b1_a_module_killed_in_a_group_restart_serves_again(
    mock_clock: trio.testing.MockClock,
) -> None:
    config = LedgerConfig(ledger_id="t", strategy=Strategy.ONE_FOR_ALL)
    async with open_ledger(config) as engine:
        slow = await engine.add(Slow(), shutdown=1.0, timeout=None)
        await engine.add(CrashOnce())
        await engine.append(Record("k", 1))  # crash-once crashes: the group restart kills slow
        await trio.sleep(20)
        with trio.move_on_after(60) as scope:
            await slow.ask(lambda m: None)
        assert not scope.cancelled_caught, f"slow never answers: {slow.status}"
        assert slow.status.incarnation == 2


# Regression: chaos bug B2: stop_all hung while the supervisor launched a restart
async def test_b2_stop_all_while_the_supervisor_launches_a_restart(
    mock_clock: trio.testing.MockClock,
) -> None:
    hung = 0
    for _ in range(20):  # the window is one scheduling step: try it 20 times
        async with open_ledger(LedgerConfig(ledger_id="t")) as engine:
            handle = await engine.add(CrashOnce())
            await engine.append(Record("k", 1))
            while handle.status.restarts == 0:  # the supervisor is now in nursery.start
                await trio.lowlevel.checkpoint()
            with trio.move_on_after(60) as scope:
                await engine.stop_all()
            hung += scope.cancelled_caught
    assert hung == 0, f"stop_all never returned in {hung} of 20 attempts"


class SlowSibling(Module):
    id = "sibling"

    def __init__(self) -> None:
        self.seen: list[int | None] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(1)
        self.seen.append(record.seq)


# Regression: chaos bug B4: a stop during a group restart dropped a healthy sibling's deliveries
async def test_b4_a_stop_during_a_group_restart_drains_the_siblings(
    mock_clock: trio.testing.MockClock,
) -> None:
    sibling = SlowSibling()
    config = LedgerConfig(ledger_id="t", strategy=Strategy.ONE_FOR_ALL)
    async with open_ledger(config, modules=[CrashOnce(), sibling]) as engine:
        for n in range(3):
            await engine.append(Record("k", n))  # crash-once crashes on seq 0
        await engine.modules.get("sibling").wait_state(ModuleState.RESTARTING)
        await trio.sleep(0.5)  # the group restart waits for the sibling's delivery to finish
        await engine.stop_all()
    assert engine.modules.get("sibling").status.stop_result == "clean"
    assert sibling.seen == [0, 1, 2]  # fails: [0]


async def test_a_crash_mid_run_leaves_the_cursor_at_the_last_record_processed() -> None:
    # Regression: a task module that crashed part-way through a run of deliveries counted
    # the records it finished in `processed` but left `cursor` at the run before.
    class Third(Module):
        id = "third"

        def __init__(self) -> None:
            self.seen: list[int] = []

        async def after_append(self, record: Record, hash: Hash) -> None:
            if len(self.seen) == 2:
                raise OSError("third record")
            assert record.seq is not None
            self.seen.append(record.seq)

    async with open_ledger(config()) as engine:
        module = Third()
        handle = await engine.add(module, restart=Restart.TEMPORARY)
        await engine.append_many([Record("k", n) for n in range(5)])
        await settle()
        assert handle.state is ModuleState.FAILED
        assert module.seen == [0, 1]
        assert handle.status.processed == 2
        assert handle.status.cursor == 1
