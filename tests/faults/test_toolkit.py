"""nucleus_actors.testing: fault plans, probes, schedules and the invariant checks."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Entry,
    Hash,
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    Module,
    ModuleContext,
    ModuleError,
    ModuleSpec,
    ModuleState,
    Receipt,
    Record,
    RecordRejected,
    Restart,
    StorageError,
    attached_instruments,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, StorageBatch
from nucleus_actors.testing import (
    TAG_KEY,
    AppendCall,
    Callback,
    CallbackEvent,
    CallbackLog,
    CallOutcome,
    Fault,
    FaultPlan,
    FaultSchedule,
    GatingProbe,
    InjectedFault,
    InvariantViolation,
    Probe,
    TrackedLedger,
    open_tracked_ledger,
)


class Counter(Module):
    """A module with an after_append (and no before_append)."""

    id = "counter"
    version = "1.2.3"

    def __init__(self) -> None:
        self.total = 0
        self.ctx: ModuleContext | None = None

    async def start(self, ctx: ModuleContext) -> None:
        self.ctx = ctx

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.total += 1


class Gate(Module):
    """A module with a before_append."""

    id = "gate"

    async def before_append(self, record: Record) -> Record | None:
        return None


def config(**fields: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="test", **fields)


async def append_n(ledger: TrackedLedger, n: int) -> list[Receipt]:
    return [await ledger.append(Record("k", {"n": i})) for i in range(n)]


# -- building plans ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nth": 1, "every": 2}, r"nth or every, not both \(got nth=1, every=2\)"),
        ({"nth": 0}, r"Fault.nth must be an int >= 1 or None, got 0"),
        ({"every": True}, r"Fault.every must be an int >= 1 or None, got True"),
        ({"times": -1}, r"Fault.times must be an int >= 1 or None, got -1"),
        ({"callback": "init", "where": bool}, r"Fault.where needs a callback that gets a record"),
        ({"action": "reject"}, r"a REJECT fault only fits before_append, got callback 'stop'"),
        ({"at": "middle"}, r"Fault.at must be 'entry' or 'exit', got 'middle'"),
        ({"seconds": -1.0}, r"Fault.seconds must be a finite number >= 0, got -1.0"),
        ({"seconds": float("inf")}, r"Fault.seconds must be a finite number >= 0, got inf"),
        ({"error": KeyboardInterrupt}, r"Fault.error must be an Exception subclass"),
    ],
)
def test_fault_validation_names_the_rule_and_the_value(
    kwargs: dict[str, Any], message: str
) -> None:
    options: dict[str, Any] = {"callback": "stop", "action": "crash", **kwargs}
    with pytest.raises(ValueError, match=message):
        Fault(**options)


def test_unknown_callback_or_action_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'before'"):
        FaultPlan().crash("before")
    with pytest.raises(ValueError, match="'explode'"):
        Fault(callback=Callback.STOP, action="explode")  # type: ignore[arg-type]


def test_plan_is_chainable_and_describes_itself() -> None:
    plan = (
        FaultPlan(name="sink")
        .crash("after_append", nth=3)
        .hang("stop", every=2, times=1)
        .delay("start", 0.25, at="exit")
        .reject(where=lambda r: r.kind == "x")
        .crash("init", nth=2, error=OSError)
    )
    assert plan.describe() == (
        "sink: crash after_append nth=3; hang stop every=2 times=1; "
        "delay start seconds=0.25 at=exit; reject before_append where=<lambda>; "
        "crash init nth=2 error=OSError"
    )
    assert len(plan.faults) == 5
    assert FaultPlan().describe() == "no faults"
    assert plan.describe(named=False).startswith("crash after_append nth=3; ")
    with pytest.raises(TypeError, match=r"FaultPlan\.add takes a Fault, got str"):
        FaultPlan().add("crash")  # type: ignore[arg-type]


# -- wrapping ----------------------------------------------------------------------------------
def test_wrap_keeps_id_version_and_type_and_only_the_hooks_the_class_has() -> None:
    plan = FaultPlan().crash("before_append", nth=1)
    module = Counter()
    wrapped = plan.wrap(module)
    assert wrapped is module
    assert isinstance(wrapped, Counter)
    assert (wrapped.id, wrapped.version) == ("counter", "1.2.3")
    # The plan rides on the instrumentation seam: the class is untouched (issue 12 removed
    # the class swap), so the hooks the runtime runs are exactly the class's own.
    assert type(wrapped) is Counter
    assert attached_instruments(module) != ()
    assert Counter.overrides("after_append")
    # Counter has no before_append: wrapping must not give it one (appends would then be
    # fail-closed on it).
    assert not type(wrapped).overrides("before_append")
    assert plan.wrap(module) is module  # idempotent
    assert len(attached_instruments(module)) == 1
    gate = plan.wrap(Gate())
    assert type(gate) is Gate
    assert Gate.overrides("before_append")
    assert not Gate.overrides("after_append")


def test_wrap_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match="takes a Module, a zero-argument factory or a ModuleSpec"):
        FaultPlan().wrap(42)  # type: ignore[call-overload]


async def test_wrapped_module_is_found_by_class_and_stays_out_of_appends_it_had_no_part_in(
    mock_clock: trio.testing.MockClock,
) -> None:
    plan = FaultPlan()
    async with open_ledger(config(), modules=[plan.wrap(Counter()), plan.wrap(Gate())]) as engine:
        assert engine.modules.get(Counter).id == "counter"
        assert engine.modules.get(Counter).version == "1.2.3"
        await engine.terminate("counter")
        await engine.append(Record("k", 1))  # a stopped Counter does not hold appends
        await engine.terminate("gate")
        with pytest.raises(ModuleError, match="gate"):  # a stopped Gate does (fail-closed)
            await engine.append(Record("k", 2))


# -- the example of the issue ------------------------------------------------------------------
async def test_crash_on_the_3rd_after_append_restarts_and_sees_every_record(
    mock_clock: trio.testing.MockClock,
) -> None:
    plan = FaultPlan().crash("after_append", nth=3)
    async with open_tracked_ledger(modules=[plan.wrap(Counter)]) as ledger:
        await append_n(ledger, 5)
        await ledger.wait_delivered()
        handle = ledger.modules.get(Counter)
        assert handle.status.restarts == 1
        assert handle.status.incarnation == 2
    assert plan.seen("counter") == [0, 1, 2, 3, 4]
    [fired] = plan.fired("counter")
    assert (fired.callback, fired.call, fired.seq, fired.incarnation) == (
        Callback.AFTER_APPEND,
        3,
        2,
        1,
    )
    assert fired.outcome is CallOutcome.RAISED
    assert not fired.handled
    assert "InjectedFault" in (fired.error or "")
    assert plan.calls("counter", "after_append") == 6  # 5 deliveries + 1 redelivery
    assert plan.log.incarnations("counter") == [1, 2]


async def test_injected_crash_error_carries_where_it_happened() -> None:
    plan = FaultPlan().crash("before_append", nth=2)
    async with open_ledger(config(), modules=[plan.wrap(Gate())]) as engine:
        await engine.append(Record("k", 1))
        with pytest.raises(ModuleError, match="module 'gate' crashed in before_append") as info:
            await engine.append(Record("k", 2))
    cause = info.value.__cause__
    assert isinstance(cause, InjectedFault)
    assert (cause.module_id, cause.callback, cause.call) == ("gate", Callback.BEFORE_APPEND, 2)
    assert (
        "injected crash in before_append of module 'gate' (call 2: crash before_append nth=2)"
        in str(cause)
    )


async def test_crash_at_exit_redelivers_a_record_the_module_already_saw(
    mock_clock: trio.testing.MockClock,
) -> None:
    plan = FaultPlan().crash("after_append", nth=2, at="exit")
    async with open_tracked_ledger(modules=[plan.wrap(Counter)]) as ledger:
        await append_n(ledger, 3)
        await ledger.wait_delivered()
    assert plan.seen("counter") == [0, 1, 1, 2]  # at least once


async def test_every_times_and_where_select_calls(mock_clock: trio.testing.MockClock) -> None:
    plan = (
        FaultPlan()
        .crash("after_append", every=2, times=2)
        .crash("after_append", where=lambda r: r.payload == {"n": 7}, times=1)
    )
    async with open_tracked_ledger(config(max_restarts=10), modules=[plan.wrap(Counter)]) as ledger:
        await append_n(ledger, 10)
        await ledger.wait_delivered()
    fired = [(e.call, e.seq) for e in plan.fired("counter")]
    # every=2 counts calls matching it (all): calls 2 and 4 (the 2nd is seq 2, redelivered as
    # call 3), then times=2 stops it; the where-fault fires once, on seq 7.
    assert fired == [(2, 1), (4, 2), (10, 7)]
    assert plan.seen("counter") == list(range(10))


async def test_first_added_fault_wins_a_call(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().delay("after_append", 5.0, nth=1).crash("after_append", nth=1)
    async with open_tracked_ledger(modules=[plan.wrap(Counter)]) as ledger:
        start = trio.current_time()
        await ledger.append(Record("k", 1))
        await ledger.wait_delivered()
        assert trio.current_time() - start == pytest.approx(5.0)
        assert ledger.modules.get(Counter).status.restarts == 0


async def test_hang_in_before_append_ends_with_the_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    plan = FaultPlan().hang("before_append", nth=1)
    async with open_tracked_ledger() as ledger:
        await ledger.add(plan.wrap(Gate()), timeout=2.5)
        start = trio.current_time()
        with pytest.raises(ModuleError, match="timed out in before_append") as info:
            await ledger.append(Record("k", 1))
        assert trio.current_time() - start == pytest.approx(2.5)
        assert isinstance(info.value.__cause__, TimeoutError)
        await ledger.append(Record("k", 2))  # the restarted gate lets it through
    [event] = plan.fired("gate")
    assert event.outcome is CallOutcome.CANCELLED
    report = await ledger.check()
    assert (report.acknowledged, report.failed) == (1, 1)


async def test_hang_in_stop_ends_with_the_shutdown_deadline(
    mock_clock: trio.testing.MockClock,
) -> None:
    plan = FaultPlan().hang("stop")
    async with open_tracked_ledger() as ledger:
        handle = await ledger.add(plan.wrap(Counter()), shutdown=3.0)
        await ledger.append(Record("k", 1))
    assert handle.status.stop_result == "cancelled"
    assert ledger.stop_report is not None
    assert ledger.stop_report.elapsed == pytest.approx(3.0)
    assert ledger.stop_report.bound == pytest.approx(6.0)  # longest + sum of shutdowns


async def test_reject_vetoes_with_the_reason(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().reject(reason="not today", where=lambda r: r.kind == "bad")
    async with open_tracked_ledger(modules=[plan.wrap(Gate())]) as ledger:
        await ledger.append(Record("good", 1))
        with pytest.raises(RecordRejected, match="module 'gate' rejected the record: not today"):
            await ledger.append(Record("bad", 2))
        await ledger.append(Record("good", 3))
        assert ledger.statistics().rejects == 1
    [event] = plan.fired("gate")
    assert (event.outcome, event.handled) == (CallOutcome.REJECTED, False)


async def test_delay_sleeps_on_trios_clock(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().delay("start", 4.0)
    start = trio.current_time()
    async with open_tracked_ledger(modules=[plan.wrap(Counter())]):
        assert trio.current_time() - start == pytest.approx(4.0)


class Worker(Module):
    """Spawns one background task per start; it ticks forever."""

    id = "worker"

    def __init__(self) -> None:
        self.ticks = 0

    async def start(self, ctx: ModuleContext) -> None:
        ctx.spawn(self.tick)

    async def tick(self) -> None:
        while True:
            await trio.sleep(1)
            self.ticks += 1


async def test_crash_in_background_work(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().crash("background", nth=1)
    async with open_tracked_ledger(modules=[plan.wrap(Worker())]) as ledger:
        handle = ledger.modules.get(Worker)
        await trio.sleep(5)
        assert handle.status.restarts == 1
        assert "injected crash in background of module 'worker'" in (handle.status.last_error or "")
        assert await handle.ask(lambda m: m.ticks) >= 4  # the second spawn runs
    background = plan.log.of("worker", Callback.BACKGROUND)
    assert [(e.call, e.outcome) for e in background] == [
        (1, CallOutcome.RAISED),
        (2, CallOutcome.CANCELLED),  # cancelled when the module stopped
    ]


async def test_hang_in_background_work_keeps_the_module_running(
    mock_clock: trio.testing.MockClock,
) -> None:
    plan = FaultPlan().hang("background")
    async with open_tracked_ledger(modules=[plan.wrap(Worker())]) as ledger:
        await trio.sleep(5)
        handle = ledger.modules.get(Worker)
        assert handle.state is ModuleState.RUNNING
        assert await handle.ask(lambda m: m.ticks) == 0


async def test_a_wrapped_factory_wraps_every_incarnation_and_counts_across_them(
    mock_clock: trio.testing.MockClock,
) -> None:
    made: list[Counter] = []

    def factory() -> Counter:
        made.append(Counter())
        return made[-1]

    plan = FaultPlan().crash("after_append", every=2, times=2)
    async with open_tracked_ledger(config(max_restarts=5), modules=[plan.wrap(factory)]) as ledger:
        await append_n(ledger, 4)
        await ledger.wait_delivered()
    assert len(made) == 3  # one per incarnation
    assert all(type(m) is Counter and attached_instruments(m) for m in made)  # each wrapped
    assert [e.incarnation for e in plan.fired("counter")] == [1, 2]
    assert plan.seen("counter") == [0, 1, 2, 3]


async def test_a_wrapped_spec_keeps_its_options(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().crash("after_append", nth=1)
    spec = plan.wrap(ModuleSpec(Counter(), restart=Restart.TEMPORARY, inbox=3))
    assert isinstance(spec, ModuleSpec)
    assert (spec.restart, spec.inbox) == (Restart.TEMPORARY, 3)
    async with open_tracked_ledger(modules=[spec]) as ledger:
        await ledger.append(Record("k", 1))
        await ledger.wait_delivered()
        assert ledger.modules.get(Counter).state is ModuleState.FAILED
    report = await ledger.check()
    assert "TEMPORARY" in report.waived["counter"]


# -- probes ------------------------------------------------------------------------------------
async def test_probe_records_every_callback_with_incarnations(
    mock_clock: trio.testing.MockClock,
) -> None:
    probe = Probe()
    crash = FaultPlan().crash("after_append", nth=2)
    async with open_tracked_ledger(modules=[probe, crash.wrap(Counter())]) as ledger:
        receipts = await append_n(ledger, 3)
    assert probe.seen == [0, 1, 2]
    kinds = [(e.callback.value, e.incarnation, e.seq) for e in probe.log]
    assert kinds == [
        ("init", 1, None),
        ("start", 1, None),
        ("after_append", 1, 0),
        ("after_append", 1, 1),
        ("after_append", 1, 2),
        ("stop", 1, None),
    ]
    hashes = [e.hash for e in probe.log.of("probe", "after_append")]
    assert hashes == [r.hash for r in receipts]


async def test_probe_factory_shares_its_log_across_incarnations(
    mock_clock: trio.testing.MockClock,
) -> None:
    factory = Probe.factory("p")
    plan = FaultPlan().crash("after_append", nth=1)
    async with open_tracked_ledger(modules=[plan.wrap(factory)]) as ledger:
        await append_n(ledger, 2)
        await ledger.wait_delivered()
    log: CallbackLog = factory.log  # type: ignore[attr-defined]
    assert log.seen("p") == [0, 1]
    assert log.incarnations("p") == [1, 2]
    assert [e.call for e in log.of("p", "init")] == [1, 2]


async def test_gating_probe_makes_appends_wait_for_it(mock_clock: trio.testing.MockClock) -> None:
    probe = GatingProbe("gate")
    async with open_tracked_ledger(modules=[probe]) as ledger:
        await ledger.append(Record("k", 1))
        await ledger.terminate("gate")
        with pytest.raises(ModuleError, match="'gate'"):
            await ledger.append(Record("k", 2))
    assert [e.callback for e in probe.log.of("gate", "before_append")] == [Callback.BEFORE_APPEND]
    report = await ledger.check()
    assert report.waived["gate"] == "terminated, restarted or removed by the test"


# -- schedules ---------------------------------------------------------------------------------
def test_same_seed_same_plans_whatever_the_order() -> None:
    first = FaultSchedule(7)
    a1, b1 = first.plan("a").describe(), first.plan("b").describe()
    second = FaultSchedule(7)
    b2, a2 = second.plan("b").describe(), second.plan("a").describe()
    assert (a1, b1) == (a2, b2)
    assert first.plan("a") is first.plan("a")
    assert first.describe().splitlines()[0] == "fault schedule seed=7"
    assert first.rng("x").random() == FaultSchedule(7).rng("x").random()
    descriptions = {FaultSchedule(seed, max_faults=4).plan("m").describe() for seed in range(20)}
    assert len(descriptions) > 10  # seeds differ


def test_schedule_respects_its_limits() -> None:
    for seed in range(50):
        schedule = FaultSchedule(seed, max_faults=2, callbacks=["init", "after_append"])
        plan = schedule.plan("m")
        assert len(plan.faults) <= 2
        for fault in plan.faults:
            assert fault.callback in (Callback.INIT, Callback.AFTER_APPEND)
            if fault.callback is Callback.INIT:
                assert (fault.nth or fault.every or 2) >= 2  # startup is spared
        only_stop = FaultSchedule(seed).plan("s", callbacks=["stop"], max_faults=3)
        assert all(f.action.value != "reject" for f in only_stop.faults)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"seed": "1"}, TypeError, r"seed must be an int, got '1'"),
        ({"max_faults": -1}, ValueError, r"max_faults must be an int >= 0, got -1"),
        ({"horizon": 1}, ValueError, r"horizon must be an int >= 2, got 1"),
        ({"max_delay": -0.5}, ValueError, r"max_delay must be >= 0, got -0.5"),
        ({"callbacks": []}, ValueError, r"at least one callback and one action"),
    ],
)
def test_schedule_validation(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    options: dict[str, Any] = {"seed": 1, **kwargs}
    with pytest.raises(error, match=message):
        FaultSchedule(**options)


# -- invariant checks: they hold on a healthy run ----------------------------------------------
async def test_check_report_of_a_healthy_run(mock_clock: trio.testing.MockClock) -> None:
    probe = Probe()
    gate = FaultPlan().reject(where=lambda r: r.kind == "bad").wrap(Gate())
    storage = MemoryStorage()
    async with open_tracked_ledger(storage=storage, modules=[gate, probe]) as ledger:
        await append_n(ledger, 3)
        await ledger.append_many([Record("k", 1), Record("k", 2)])
        with pytest.raises(RecordRejected, match=r"rejected the record \(record 1 of the batch\)"):
            await ledger.append_many([Record("k", 3), Record("bad", 4)])
    report = await ledger.check()
    assert (report.length, report.appended, report.acknowledged) == (5, 5, 5)
    assert (report.failed, report.cancelled) == (2, 0)
    assert report.watched == ("gate", "probe")
    assert report.complete == ("probe",)
    assert report.waived == {"gate": "it has no after_append"}
    assert report.stop is not None
    assert report.stop.elapsed == 0.0
    assert [c.acknowledged for c in ledger.calls] == [True, True, True, True, False]
    async with LedgerEngine(ledger.config, storage) as reopened:
        stored = [e async for e in reopened.read(0)]
    assert [e.record.meta[TAG_KEY] for e in stored] == ["0", "1", "2", "3", "4"]


async def test_a_cancelled_append_may_be_stored(mock_clock: trio.testing.MockClock) -> None:
    async with open_tracked_ledger() as ledger:
        with trio.CancelScope() as scope:
            scope.cancel()
            await ledger.append(Record("k", 1))
    [call] = ledger.calls
    assert call.cancelled
    assert not call.acknowledged
    report = await ledger.check()
    assert report.cancelled == 1
    assert report.cancelled_stored in (0, 1)


async def test_untagged_ledger_checks_by_counting(mock_clock: trio.testing.MockClock) -> None:
    async with open_tracked_ledger(tag=False) as ledger:
        receipts = await append_n(ledger, 2)
    assert [c.tags for c in ledger.calls] == [(None,), (None,)]
    assert receipts[0].seq == 0
    assert (await ledger.check()).acknowledged == 2


async def test_escalation_is_checked_then_reraised(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().crash("after_append")
    probe = Probe()
    with pytest.raises(LedgerFailed, match="more than 1 restarts"):
        async with open_tracked_ledger(
            config(max_restarts=1), modules=[plan.wrap(Counter()), probe]
        ) as ledger:
            await ledger.append(Record("k", 1))
            await trio.sleep_forever()
    report = await ledger.check()
    assert report.waived["probe"] == "the ledger failed (escalation stops delivery)"


async def test_a_body_error_is_not_masked_by_the_check() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_tracked_ledger():
            raise KeyError("mine")


async def test_wait_delivered_skips_failed_modules(mock_clock: trio.testing.MockClock) -> None:
    plan = FaultPlan().crash("after_append")
    async with open_tracked_ledger() as ledger:
        handle = await ledger.add(plan.wrap(Counter()), restart=Restart.TEMPORARY)
        await ledger.append(Record("k", 1))
        await ledger.wait_delivered()
        assert handle.state is ModuleState.FAILED


# -- invariant checks: they catch violations ---------------------------------------------------
class ForgetfulStorage(MemoryStorage):
    """Acknowledges the 3rd batch but never stores it."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    async def append(self, batch: StorageBatch) -> None:
        self.batches += 1
        if self.batches == 3:
            await trio.lowlevel.checkpoint()
            return
        await super().append(batch)

    async def head(self) -> tuple[int, Hash]:
        return await super().head()


async def test_check_catches_an_acknowledged_append_that_is_not_stored(
    mock_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(InvariantViolation) as info:
        async with open_tracked_ledger(storage=ForgetfulStorage()) as ledger:
            await append_n(ledger, 3)
    text = str(info.value)
    assert "storage holds 2 entries" in text
    assert "the ledger committed 3" in text
    assert "acknowledged receipt seq=2 hash=" in text
    assert "is not stored (storage holds 2 entries)" in text
    assert info.value.report.acknowledged == 3


class LateFailingStorage(MemoryStorage):
    """Stores the 2nd batch, then reports a failure; its head then says nothing was stored
    (`lie=True`) or cannot be read (`lie=False`)."""

    def __init__(self, *, lie: bool) -> None:
        super().__init__()
        self.lie = lie
        self.batches = 0
        self.after_failure = False

    async def append(self, batch: StorageBatch) -> None:
        self.batches += 1
        await super().append(batch)
        if self.batches == 2:
            self.after_failure = True
            raise StorageError("disk said no (after writing)")

    async def head(self) -> tuple[int, Hash]:
        length, head = await super().head()
        if self.after_failure:
            self.after_failure = False
            if not self.lie:
                raise StorageError("cannot read the head either")
            return length - 1, (await _first(self)).hash
        return length, head


async def _first(storage: MemoryStorage) -> Entry:
    async for entry in storage.read(0, 1):
        return entry
    raise AssertionError("empty")


async def _append_twice(ledger: TrackedLedger, message: str) -> None:
    async with ledger:
        await ledger.init_all()
        await ledger.start_all()
        await ledger.append(Record("k", 0))
        with pytest.raises(StorageError, match=message):
            await ledger.append(Record("k", 1))


async def test_check_catches_a_failed_append_that_was_stored(
    mock_clock: trio.testing.MockClock,
) -> None:
    ledger = TrackedLedger(config(), LateFailingStorage(lie=True))
    await _append_twice(ledger, "append failed, nothing stored: disk said no")
    with pytest.raises(InvariantViolation) as info:
        await ledger.check()
    assert (
        "entry 1 is stored although its append failed with StorageError('append failed, "
        "nothing stored: disk said no (after writing)')"
    ) in info.value.violations


async def test_an_append_storage_could_not_confirm_may_be_stored(
    mock_clock: trio.testing.MockClock,
) -> None:
    ledger = TrackedLedger(config(), LateFailingStorage(lie=False))
    await _append_twice(ledger, "storage could not tell whether it was stored")
    assert ledger.calls[1].indeterminate
    report = await ledger.check()
    assert (report.indeterminate, report.cancelled_stored, report.failed) == (1, 1, 0)


class Stripper(Module):
    """A before_append that replaces the meta (so the tag is lost)."""

    id = "stripper"

    async def before_append(self, record: Record) -> Record | None:
        return record.replace(meta={})


async def test_check_catches_entries_it_cannot_account_for(
    mock_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(InvariantViolation, match=r"entry 0 has no 'nucleus.testing.tag' meta"):
        async with open_tracked_ledger(modules=[Stripper()]) as ledger:
            await ledger.append(Record("k", 1))


async def test_check_catches_missing_and_misordered_deliveries(
    mock_clock: trio.testing.MockClock,
) -> None:
    probe = Probe()
    async with open_tracked_ledger(modules=[probe]) as ledger:
        receipts = await append_n(ledger, 4)
    # Rewrite the probe's log as if the runtime had skipped seq 1 and replayed seq 3 early.
    real = probe.log.events
    fake = CallbackLog()
    for event in real:
        if event.callback is Callback.AFTER_APPEND and event.seq == 1:
            continue
        fake.add(event)
    event_3 = next(e for e in real if e.seq == 3)
    fake.add(event_3)
    ledger.watch("probe", fake)
    with pytest.raises(InvariantViolation) as info:
        await ledger.check()
    violations = info.value.violations
    assert "module 'probe' (incarnation 1) got seq 2, expected seq 1 (in order)" in violations
    assert "module 'probe' (incarnation 1) got seq 3, expected seq 4 (in order)" in violations
    assert "module 'probe' never received 1 committed entry (seq 1)" in violations
    assert receipts[1].seq == 1


async def test_check_catches_a_wrong_receipt_and_a_redelivery_out_of_place(
    mock_clock: trio.testing.MockClock,
) -> None:
    probe = Probe()
    async with open_tracked_ledger(modules=[probe]) as ledger:
        await append_n(ledger, 2)
    good = ledger.calls[0]
    assert good.receipts is not None
    wrong = Receipt(good.receipts[0].seq, Hash(bytes(32)), good.receipts[0].timestamp + 1)
    ledger.calls.append(
        AppendCall(
            records=good.records, tags=good.tags, receipts=(wrong,), error=None, cancelled=False
        )
    )
    crashed = CallbackLog()
    first, second = probe.log.of("probe", "after_append")
    crashed.add(_replace(first, outcome=CallOutcome.RAISED, handled=False))
    crashed.add(_replace(second, incarnation=2))
    ledger.watch("probe", crashed)
    with pytest.raises(InvariantViolation) as info:
        await ledger.check()
    text = "\n".join(info.value.violations)
    assert "entry 0 is stored with hash" in text
    assert "the receipt said 0000000000000000" in text
    assert "entry 0 is stored with timestamp" in text
    assert (
        "module 'probe' (incarnation 2) got seq 1 first, expected redelivery of seq 0 "
        "(incarnation 1 ended on seq 0, raised)"
    ) in text


def _replace(event: CallbackEvent, **changes: Any) -> CallbackEvent:
    import dataclasses

    return dataclasses.replace(event, **changes)


class SlowClose(MemoryStorage):
    async def close(self) -> None:
        await trio.sleep(100)
        await super().close()


async def test_check_catches_a_stop_over_its_deadlines(mock_clock: trio.testing.MockClock) -> None:
    with pytest.raises(InvariantViolation, match=r"stopping took 100.000 s, over the 10.000 s"):
        async with open_tracked_ledger(storage=SlowClose(), modules=[Probe()]):
            pass


def test_invariant_violation_lists_at_most_25() -> None:
    from nucleus_actors.testing import CheckReport

    report = CheckReport(
        length=0, appended=0, acknowledged=0, failed=0, cancelled=0, cancelled_stored=0,
        watched=(), complete=(),
    )  # fmt: skip
    error = InvariantViolation([f"v{i}" for i in range(30)], report)
    assert isinstance(error, AssertionError)
    assert str(error).startswith("30 invariant violation(s):\n  - v0\n")
    assert str(error).endswith("  - v24\n  ... and 5 more")
    assert error.violations[-1] == "v29"
