"""Runtime bugs the chaos suite found, each as its smallest reproduction.

B1 (fixed in e666a6a, kept as regression tests): a `stop` the supervisor queued for an
incarnation that ended some other way (its restart failed, or it was killed for overstaying its
shutdown in a group restart) stayed in the mailbox; the next incarnation obeyed it and stopped
at once while its state still said RUNNING: a validator then held every append forever.

B2 (fixed: actors launched with start_soon and a scope made up front):
`stop_all` (and leaving `async with`) hangs forever when it begins while the
supervisor is launching a restarted module: `cancel_supervisor()` cancels the supervisor inside
`nursery.start(child._run)`, trio's `task_status.started()` then leaves the new (shielded,
long-lived) actor in `start`'s temporary nursery, `start` waits for that actor to exit, so the
supervisor never releases its lock and `stop_supervising()` waits for it forever.

B4 (fixed: an abandoned group restart withdraws a sibling's queued stop):
a stop that began while a group restart was stopping a healthy sibling dropped that sibling's
queued deliveries (the restart's stop, queued ahead of them, ran first and the inbox was shut).

B5 (fixed: the stop adopts and delivers it before the modules stop):
what B3's fix left: the adoption happens only when a later batch reaches storage.
If the ledger stops first, the landed entry is never delivered and the engine's `state.length`
never counts it (a reopen finds it). `stop_all` promises that appends in flight either complete
fully or fail with no trace; this one does neither.

B3 (fixed: adopted entries are verified against the chain and delivered):
an append whose storage outcome is unknown (the backend raised, then its head could
not be read: "storage could not tell whether it was stored") and that did land is adopted into
the chain when the next batch resyncs the head (`Pipeline._resync_head`), but its after_append
delivery is never queued: every module misses that committed entry (and
`statistics().appends` does not count it).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Hash,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleContext,
    ModuleError,
    ModuleState,
    Record,
    StorageError,
    Strategy,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, StorageBatch


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


async def test_b3_an_adopted_entry_is_delivered(mock_clock: trio.testing.MockClock) -> None:
    seen = Seen()
    async with open_ledger(
        LedgerConfig(ledger_id="t"), storage=UnsureStorage(), modules=[seen]
    ) as engine:
        await engine.append(Record("k", 0))
        with pytest.raises(StorageError, match="storage could not tell whether it was stored"):
            await engine.append(Record("k", 1))  # it did land
        third = await engine.append(Record("k", 2))
        assert third.seq == 2  # seq 1 was adopted into the chain
    assert seen.seqs == [0, 1, 2]  # fails: [0, 2]


class SlowSibling(Module):
    id = "sibling"

    def __init__(self) -> None:
        self.seen: list[int | None] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(1)
        self.seen.append(record.seq)


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


async def test_b5_a_landed_entry_of_unknown_outcome_is_delivered_before_the_stop(
    mock_clock: trio.testing.MockClock,
) -> None:
    seen = Seen()
    storage = UnsureStorage()
    async with open_ledger(LedgerConfig(ledger_id="t"), storage=storage, modules=[seen]) as engine:
        await engine.append(Record("k", 0))
        with pytest.raises(StorageError, match="storage could not tell whether it was stored"):
            await engine.append(Record("k", 1))  # it did land; no append follows
    async with LedgerEngine(LedgerConfig(ledger_id="t"), storage) as reopened:
        assert reopened.state.length == 2  # it landed
    assert seen.seqs == [0, 1]  # fails: [0]
    assert engine.state.length == 2  # fails: 1
