"""The fault toolkit on durable modules: crash during catch-up, crash at the switch to live,
stop during catch-up, faults in `resume_after`; and the "no gap, in order" invariant of
`TrackedLedger.check` for durable modules (it must catch a gap)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    CallbackCall,
    CallbackResult,
    Hash,
    Instrument,
    LedgerConfig,
    Module,
    ModuleContext,
    ModuleSpec,
    Record,
    attach_instrument,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage
from nucleus_actors.testing import (
    Callback,
    CallbackLog,
    CallOutcome,
    FaultPlan,
    InvariantViolation,
    Probe,
    open_tracked_ledger,
)

CONFIG = LedgerConfig(ledger_id="test")


async def fill(storage: MemoryStorage, count: int) -> None:
    """`count` entries committed before the modules under test are registered."""
    async with open_tracked_ledger(CONFIG, storage=storage) as ledger:
        for n in range(count):
            await ledger.append(Record("old", n))


def durable(module: Any, **options: Any) -> ModuleSpec[Any]:
    return ModuleSpec(module, durable=True, timeout=1.0, shutdown=0.5, **options)


class Owner(Module):
    """Owns its position: `store` plays its database (effect and position in one step)."""

    id = "owner"

    def __init__(self, store: dict[str, int]) -> None:
        self.store = store

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        return self.store.get("last")

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert record.seq is not None
        self.store.setdefault("seen", 0)
        self.store["seen"] += 1
        self.store["last"] = record.seq


async def test_crash_during_catch_up(mock_clock: trio.testing.MockClock) -> None:
    storage = MemoryStorage()
    await fill(storage, 600)  # three catch-up chunks of 256
    plan = FaultPlan().crash("after_append", nth=300).hang("after_append", nth=450)
    async with open_tracked_ledger(
        CONFIG, storage=storage, modules=[durable(plan.wrap(Probe.factory("probe")))]
    ) as ledger:
        await ledger.modules.get("probe").ask(lambda m: None)  # caught up
        assert ledger.modules.get("probe").status.restarts == 2
    report = await ledger.check()
    assert report.complete == ("probe",)
    # Both faults hit the catch-up from storage; each delivery came again first after it.
    seen = plan.seen("probe")
    assert seen == sorted(set(seen)) == list(range(600))
    fired = plan.fired("probe")
    assert [(e.seq, e.outcome) for e in fired] == [
        (299, CallOutcome.RAISED),
        (448, CallOutcome.CANCELLED),  # call 450: seq 299 came twice
    ]


async def test_crash_at_the_switch_to_live(mock_clock: trio.testing.MockClock) -> None:
    """The last entry read from storage crashes while appends go on: the restart catches up
    again and switches to live deliveries with no gap, no duplicate, no reorder."""
    storage = MemoryStorage()
    await fill(storage, 40)
    plan = FaultPlan().crash("after_append", where=lambda r: r.seq == 39, times=1)
    probe = Probe.factory("probe")
    async with open_tracked_ledger(
        CONFIG, storage=storage, modules=[durable(plan.wrap(probe), inbox=2)]
    ) as ledger:

        async def writer(k: int) -> None:
            for n in range(15):
                await ledger.append(Record("live", {"k": k, "n": n}))

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(writer, k)
        await ledger.modules.get("probe").ask(lambda m: None)
    report = await ledger.check()
    assert report.complete == ("probe",)
    assert plan.seen("probe") == list(range(100))
    (crash,) = plan.fired("probe")
    assert crash.seq == 39
    after = [e.seq for e in plan.log.of("probe", Callback.AFTER_APPEND) if e.incarnation == 2]
    assert after == list(range(39, 100))  # the crashed one first


async def test_stop_during_catch_up_then_resume(mock_clock: trio.testing.MockClock) -> None:
    storage = MemoryStorage()
    await fill(storage, 300)
    plan = FaultPlan().delay("after_append", 0.01)  # slow: it is still catching up at stop
    async with open_tracked_ledger(
        CONFIG, storage=storage, modules=[durable(plan.wrap(Probe.factory("probe")))]
    ) as ledger:
        await trio.sleep(1)  # ~100 processed
        lag = ledger.modules.get("probe").status.lag
        assert 0 < lag < 300
    report = await ledger.check()
    assert "probe" in report.waived  # lagging at close: it catches up on its next start
    first = plan.seen("probe")
    assert first == list(range(len(first)))
    again = FaultPlan()
    async with open_tracked_ledger(
        CONFIG, storage=storage, modules=[durable(again.wrap(Probe.factory("probe")))]
    ) as ledger:
        await ledger.modules.get("probe").ask(lambda m: None)
    report = await ledger.check()
    assert report.complete == ("probe",)
    # It resumed from its stored cursor (stored at stop): no gap, nothing before it again.
    assert again.seen("probe") == list(range(len(first), 300))


async def test_faults_in_resume_after_are_crashes_and_it_resumes_after_its_own_position(
    mock_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    await fill(storage, 10)
    store: dict[str, int] = {"last": 4}  # its own store says: done up to seq 4
    # A crash in after_append (seq 7) restarts it; the restart's resume_after crashes, the
    # next one hangs past the timeout, the fourth resumes it.
    plan = (
        FaultPlan()
        .crash("after_append", nth=3)
        .crash("resume_after", nth=2)
        .hang("resume_after", nth=3)
    )
    config = LedgerConfig(ledger_id="test", max_restarts=10)
    async with open_tracked_ledger(
        config, storage=storage, modules=[durable(plan.wrap(lambda: Owner(store)))]
    ) as ledger:
        handle = ledger.modules.get("owner")
        await ledger.append(Record("new", 10))
        await handle.ask(lambda m: None)
        assert handle.status.restarts == 3
    assert store == {"last": 10, "seen": 6}  # seqs 5..10, each once
    resumes = [e.outcome for e in plan.log.of("owner", Callback.RESUME_AFTER)]
    assert resumes == [
        CallOutcome.RETURNED,
        CallOutcome.RAISED,
        CallOutcome.CANCELLED,
        CallOutcome.RETURNED,
    ]
    report = await ledger.check()
    assert report.complete == ("owner",)
    assert plan.seen("owner") == [5, 6, 7, 8, 9, 10]


async def test_resume_after_is_observed_by_instruments(
    mock_clock: trio.testing.MockClock,
) -> None:
    calls: list[tuple[str, str]] = []

    class Recorder(Instrument):
        def after_callback(self, call: CallbackCall, result: CallbackResult) -> None:
            if call.callback != "after_append":
                calls.append((call.callback, result.outcome.value))

    store: dict[str, int] = {}
    module = Owner(store)
    attach_instrument(module, Recorder())
    async with open_ledger(CONFIG, modules=[durable(module)]) as engine:
        await engine.append_many([Record("k", n) for n in range(3)])
    assert calls == [
        ("init", "returned"),
        ("resume_after", "returned"),
        ("start", "returned"),
        ("stop", "returned"),
    ]


async def test_check_catches_a_gap_of_a_durable_module(
    mock_clock: trio.testing.MockClock,
) -> None:
    probe = Probe()
    async with open_tracked_ledger(CONFIG, modules=[durable(probe)]) as ledger:
        for n in range(4):
            await ledger.append(Record("k", n))
        await ledger.modules.get("probe").ask(lambda m: None)
    # As if the runtime had skipped seq 2 of the durable module.
    fake = CallbackLog()
    for event in probe.log.events:
        if event.callback is not Callback.AFTER_APPEND or event.seq != 2:
            fake.add(event)
    ledger.watch("probe", fake)
    with pytest.raises(InvariantViolation) as info:
        await ledger.check()
    assert "module 'probe' (incarnation 1) got seq 3, expected seq 2 (in order)" in (
        info.value.violations
    )


async def test_check_catches_a_durable_module_starting_after_a_gap(
    mock_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    await fill(storage, 5)
    probe = Probe()
    async with open_tracked_ledger(CONFIG, storage=storage, modules=[durable(probe)]) as ledger:
        await ledger.append(Record("k", 5))
        await ledger.append(Record("k", 6))
        await ledger.modules.get("probe").ask(lambda m: None)
    report = await ledger.check()  # from seq 0 (start_at="start"), before this session's 5
    assert report.complete == ("probe",)
    assert probe.seen == list(range(7))
    # As if it had resumed after seq 5: this session's first entry never reached it.
    fake = CallbackLog()
    for event in probe.log.events:
        if event.callback is not Callback.AFTER_APPEND or event.seq == 6:
            fake.add(event)
    ledger.watch("probe", fake)
    with pytest.raises(InvariantViolation) as info:
        await ledger.check()
    assert info.value.violations == [
        "module 'probe' (incarnation 1) got seq 6 first: a durable module resumes at its "
        "position + 1, at most seq 5 here (a gap)",
        "module 'probe' never received 1 committed entry (seq 5)",
    ]
