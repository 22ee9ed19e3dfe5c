"""The append path: hooks, vetoes, crashes, fail-closed, sizes, batches, cancellation, reads."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from nucleus_actors import (
    Backoff,
    CommitUnknown,
    Hash,
    IntegrityError,
    InvalidRecord,
    LedgerConfig,
    LedgerEngine,
    LifecycleError,
    Module,
    ModuleError,
    ModuleState,
    NucleusError,
    Record,
    RecordRejected,
    Restart,
    StorageError,
    open_ledger,
)
from nucleus_actors.hashing import canonical_bytes, genesis
from nucleus_actors.storage import MemoryStorage, StorageBatch
from tests.conftest import Gate, Recorder

Log = list[tuple[str, str, Any]]


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="test", **kw)


class Stamp(Module):
    """Adds its id to meta["path"], so we can see the order hooks ran in."""

    def __init__(self, module_id: str) -> None:
        self.id = module_id

    async def before_append(self, record: Record) -> Record | None:
        path = record.meta.get("path", "")
        return record.with_meta(path=f"{path}/{self.id}")


class Veto(Module):
    id = "veto"

    async def before_append(self, record: Record) -> Record | None:
        if record.payload.get("bad"):
            raise RecordRejected(f"bad record {record.payload['n']}")
        return None


async def test_before_append_chain_order_and_committed_record() -> None:
    probe = Recorder("probe", [])
    async with open_ledger(config(), modules=[Stamp("s1"), Stamp("s2"), probe]) as engine:
        receipt = await engine.append(Record("k", {"n": 1}))
        entry = await engine.get(receipt.seq)
        assert entry.record.meta == {"path": "/s1/s2"}
        assert (entry.record.seq, entry.record.timestamp) == (0, receipt.timestamp)
        assert entry.hash == receipt.hash == engine.state.head
        assert entry.canonical == canonical_bytes(entry.record)
        assert await engine.modules.get("probe").ask(lambda m: m.seen) == [0]


async def test_rejection_names_module_and_stores_nothing() -> None:
    async with open_ledger(config(), modules=[Veto()]) as engine:
        with pytest.raises(
            RecordRejected, match=r"module 'veto' rejected the record: bad record 1"
        ):
            await engine.append(Record("k", {"bad": True, "n": 1}))
        assert engine.state.length == 0
        assert engine.statistics().rejects == 1
        await engine.append(Record("k", {"n": 2}))
        assert engine.state.length == 1


async def test_rejection_in_a_batch_fails_only_that_append() -> None:
    async with open_ledger(config(), modules=[Veto(), Recorder("probe", [])]) as engine:
        results: dict[int, object] = {}

        async def one(n: int) -> None:
            try:
                results[n] = (await engine.append(Record("k", {"n": n, "bad": n % 3 == 0}))).seq
            except RecordRejected as exc:
                results[n] = exc

        async with trio.open_nursery() as nursery:
            for n in range(12):
                nursery.start_soon(one, n)
        rejected = [n for n, r in results.items() if isinstance(r, RecordRejected)]
        assert sorted(rejected) == [0, 3, 6, 9]
        seqs = sorted(r for r in results.values() if isinstance(r, int))
        assert seqs == list(range(8))
        assert await engine.modules.get("probe").ask(lambda m: m.seen) == list(range(8))


async def test_append_many_is_all_or_nothing() -> None:
    async with open_ledger(config(), modules=[Veto()]) as engine:
        receipts = await engine.append_many([Record("k", {"n": n}) for n in range(5)])
        assert [r.seq for r in receipts] == [0, 1, 2, 3, 4]
        batch = [Record("k", {"n": n, "bad": n == 2}) for n in range(5)]
        with pytest.raises(
            RecordRejected, match=r"\(record 2 of the batch\): bad record 2"
        ) as info:
            await engine.append_many(batch)
        assert info.value.index == 2
        assert engine.state.length == 5
        assert await engine.append_many([]) == []


async def test_crash_in_before_append_fails_the_append_and_stores_nothing() -> None:
    log: Log = []
    gate = Gate("gate", log, fail={"before": lambda n, payload: payload == {"n": 1}})
    async with open_ledger(config(), modules=[gate]) as engine:
        with pytest.raises(ModuleError, match=r"module 'gate' crashed in before_append") as info:
            await engine.append(Record("k", {"n": 1}))
        assert info.value.module_id == "gate"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert engine.state.length == 0
        # PERMANENT: restarted; the next append goes through the new incarnation.
        receipt = await engine.append(Record("k", {"n": 2}))
        assert receipt.seq == 0
        handle = engine.modules.get("gate")
        assert (handle.state, handle.status.restarts, handle.status.crashes) == (
            ModuleState.RUNNING,
            1,
            1,
        )
        assert engine.statistics().crashes == 1


async def test_fail_closed_while_failed_until_restart_or_remove() -> None:
    async with LedgerEngine(config()) as engine:
        gate = Gate("gate", [], fail={"before": lambda n, _: n == 1})
        engine.register(gate, restart=Restart.TEMPORARY)
        await engine.init_all()
        await engine.start_all()
        with pytest.raises(ModuleError, match=r"module 'gate' crashed in before_append"):
            await engine.append(Record("k", 1))
        assert engine.modules.get("gate").state is ModuleState.FAILED
        # A dead validator never lets records through.
        with pytest.raises(
            ModuleError, match=r"module 'gate' is FAILED .* until restart\('gate'\)"
        ):
            await engine.append(Record("k", 2))
        assert engine.state.length == 0
        await engine.restart("gate")  # restarted by hand: the validator works again
        assert (await engine.append(Record("k", 3))).seq == 0
        await engine.terminate("gate")
        with pytest.raises(ModuleError, match=r"module 'gate' is STOPPED"):
            await engine.append(Record("k", 4))
        await engine.remove("gate")  # removed: appends no longer wait for it
        assert (await engine.append(Record("k", 5))).seq == 1


async def test_terminated_validator_holds_appends_closed() -> None:
    async with open_ledger(config(), modules=[Veto()]) as engine:
        await engine.terminate("veto")
        with pytest.raises(ModuleError, match=r"module 'veto' is STOPPED \(terminated\)"):
            await engine.append(Record("k", {"n": 1}))
        await engine.restart("veto")
        assert (await engine.append(Record("k", {"n": 1}))).seq == 0


async def test_appends_wait_while_validator_restarts(mock_clock: trio.testing.MockClock) -> None:

    gate = Gate("gate", [], fail={"before": lambda n, _: n == 1})
    cfg = config(backoff=Backoff(initial=10.0, reset_after=1000))
    async with open_ledger(cfg, modules=[gate]) as engine:
        with pytest.raises(ModuleError):
            await engine.append(Record("k", 1))
        assert engine.modules.get("gate").state is ModuleState.RESTARTING
        start = trio.current_time()
        receipt = await engine.append(Record("k", 2))  # waits for the restart (10 s backoff)
        assert trio.current_time() - start == pytest.approx(10.0)
        assert receipt.seq == 0


class Returns(Module):
    id = "returns"

    def __init__(self, value: object) -> None:
        self.value = value

    async def before_append(self, record: Record) -> Record | None:
        return self.value  # type: ignore[return-value]


async def test_hook_returning_a_non_record_is_a_crash() -> None:
    async with open_ledger(config(), modules=[Returns({"not": "a record"})]) as engine:
        with pytest.raises(ModuleError, match=r"crashed in before_append") as info:
            await engine.append(Record("k", 1))
        assert isinstance(info.value.__cause__, TypeError)
        assert "must return a Record or None, got dict" in str(info.value.__cause__)
        assert engine.state.length == 0


class Grow(Module):
    id = "grow"

    async def before_append(self, record: Record) -> Record | None:
        return record.replace(payload="x" * 200)


async def test_size_is_checked_before_and_after_hooks() -> None:
    probe = Recorder("probe", [])
    async with open_ledger(config(max_record_bytes=150), modules=[probe]) as engine:
        with pytest.raises(InvalidRecord, match=r"canonical bytes, over max_record_bytes=150"):
            await engine.append(Record("k", "y" * 200))
    async with open_ledger(config(max_record_bytes=150), modules=[Grow(), probe]) as engine:
        with pytest.raises(InvalidRecord, match=r"after before_append, over max_record_bytes=150"):
            await engine.append(Record("k", 1))
        assert engine.state.length == 0
    with pytest.raises(InvalidRecord, match="append takes a Record, got dict"):
        async with open_ledger(config()) as engine:
            await engine.append({"kind": "k"})  # type: ignore[arg-type]


async def test_record_of_exactly_the_limit_is_accepted() -> None:
    record = Record("k", "z")
    size = len(canonical_bytes(record.replace(seq=0, timestamp=1_700_000_000_000_000)))
    clock = iter(range(1_700_000_000_000_000, 1_800_000_000_000_000))
    cfg = config(max_record_bytes=size, wall_clock=lambda: next(clock))
    async with open_ledger(cfg) as engine:
        receipt = await engine.append(record)
        assert len((await engine.get(receipt.seq)).canonical) == size


async def test_timestamps_never_go_back() -> None:
    times = iter([5_000, 3_000, 9_000, 1_000])
    async with open_ledger(config(wall_clock=lambda: next(times))) as engine:
        stamps = [(await engine.append(Record("k", n))).timestamp for n in range(4)]
    assert stamps == [5_000, 5_000, 9_000, 9_000]


async def test_ask_after_append_sees_the_delivery() -> None:
    class Slow(Recorder):
        async def after_append(self, record: Record, hash: Hash) -> None:
            await trio.sleep(0.01)
            await super().after_append(record, hash)

    async with open_ledger(config(), modules=[Slow("slow", [])]) as engine:
        for n in range(5):
            await engine.append(Record("k", n))
        assert await engine.modules.get("slow").ask(lambda m: list(m.seen)) == [0, 1, 2, 3, 4]


class Blocked(Module):
    """after_append waits until released."""

    id = "blocked"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.seen: list[int] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        await self.release.wait()
        assert record.seq is not None
        self.seen.append(record.seq)


async def test_backpressure_bounds_completed_appends() -> None:
    """With a stalled BLOCK module of inbox N, exactly N appends complete; the next waits."""
    blocked = Blocked()
    async with open_ledger(config()) as engine:
        await engine.add(blocked, inbox=4, timeout=None)
        done: list[int] = []

        async def appender() -> None:
            for n in range(10):
                done.append((await engine.append(Record("k", n))).seq)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(appender)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [0, 1, 2, 3]  # deliveries 0..3 fill the inbox (0 is in progress)
            status = engine.modules.get("blocked").status
            assert status.inbox_depth == 4
            assert engine.state.length == 5  # the 5th is stored, waiting to be queued
            blocked.release.set()
        assert done == list(range(10))
        assert await engine.modules.get("blocked").ask(lambda m: m.seen) == list(range(10))


async def test_cancelled_append_before_storage_is_withdrawn() -> None:
    gate_open = trio.Event()

    class Hold(Module):
        id = "hold"

        async def before_append(self, record: Record) -> Record | None:
            await gate_open.wait()
            return None

    async with open_ledger(config(), modules=[Hold(), Recorder("probe", [])]) as engine:
        with trio.move_on_after(0.05) as scope:
            await engine.append(Record("k", "withdrawn"))
        assert scope.cancelled_caught
        gate_open.set()
        receipt = await engine.append(Record("k", "kept"))
        assert receipt.seq == 0
        assert [e.record.payload async for e in engine.read()] == ["kept"]
        assert await engine.modules.get("probe").ask(lambda m: m.seen) == [0]


async def test_hung_hook_is_bounded_by_timeout(mock_clock: trio.testing.MockClock) -> None:
    hang = Gate("hang", [], hang={"before": lambda n, _: n == 1})
    async with open_ledger(config()) as engine:
        await engine.add(hang, timeout=2.0)
        start = trio.current_time()
        with pytest.raises(ModuleError, match=r"module 'hang' timed out in before_append") as info:
            await engine.append(Record("k", 1))
        assert trio.current_time() - start == pytest.approx(2.0)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert "timeout of 2.0 s" in str(info.value.__cause__)
        assert (await engine.append(Record("k", 2))).seq == 0  # restarted
        assert await engine.verify() == engine.state.head


async def test_ask_exception_goes_to_caller_and_is_not_a_crash() -> None:
    async with open_ledger(config(), modules=[Recorder("r", [])]) as engine:
        handle = engine.modules.get("r")

        def boom(m: Recorder) -> None:
            raise KeyError("from ask")

        with pytest.raises(KeyError, match="from ask"):
            await handle.ask(boom)
        assert handle.status.crashes == 0
        assert handle.state is ModuleState.RUNNING

        async def add(m: Recorder, a: int, b: int) -> int:
            await trio.lowlevel.checkpoint()
            return a + b

        assert await handle.ask(add, 2, 3) == 5


async def _hang(m: object) -> None:
    await trio.sleep_forever()


async def test_ask_timeout_is_a_crash(mock_clock: trio.testing.MockClock) -> None:
    async with open_ledger(config()) as engine:
        handle = await engine.add(Recorder("r", []), timeout=1.0)
        with pytest.raises(ModuleError, match=r"module 'r' timed out in ask") as info:
            await handle.ask(_hang)
        assert isinstance(info.value.__cause__, TimeoutError)
        await trio.testing.wait_all_tasks_blocked()  # let the supervisor restart it
        assert (handle.state, handle.status.restarts) == (ModuleState.RUNNING, 1)


async def test_cancelled_ask_lets_the_callback_finish(
    mock_clock: trio.testing.MockClock,
) -> None:
    finished: list[int] = []

    async def slow(m: Recorder) -> int:
        await trio.sleep(0.05)
        finished.append(1)
        return 1

    async with open_ledger(config(), modules=[Recorder("r", [])]) as engine:
        handle = engine.modules.get("r")
        with trio.move_on_after(0.01):
            await handle.ask(slow)
        assert await handle.ask(lambda m: 2) == 2  # queued behind the running slow()
        assert finished == [1]


async def test_reads_get_and_index_errors() -> None:
    async with open_ledger(config()) as engine:
        await engine.append_many([Record("k", n) for n in range(5)])
        assert (await engine.get(3)).record.payload == 3
        assert [e.seq async for e in engine.read(1, 4)] == [1, 2, 3]
        assert [e.seq async for e in engine.read()] == [0, 1, 2, 3, 4]
        assert [e.seq async for e in engine.read(4, None)] == [4]
        for bad in (5, -1):
            with pytest.raises(
                IndexError, match=rf"seq {bad} is not in ledger 'test' \(length 5\)"
            ):
                await engine.get(bad)
        with pytest.raises(ValueError, match="start must be an int >= 0"):
            [e async for e in engine.read(-2)]


async def test_verify_names_the_tampered_seq() -> None:
    storage = MemoryStorage()
    async with open_ledger(config(), storage=storage) as engine:
        await engine.append_many([Record("k", n) for n in range(6)])
        assert await engine.verify() == engine.state.head
        good = (await engine.get(3)).canonical
        storage._tamper(3, canonical=good.replace(b'"payload":3', b'"payload":4'))
        with pytest.raises(IntegrityError, match="entry 3: chain hash mismatch") as info:
            await engine.verify()
        assert info.value.seq == 3
        storage._tamper(3, canonical=good)
        storage._tamper(5, hash=bytes(32))
        with pytest.raises(IntegrityError, match="entry 5") as info:
            await engine.verify()
        assert info.value.seq == 5


async def test_reopen_continues_the_chain() -> None:
    storage = MemoryStorage()
    async with open_ledger(config(), storage=storage) as engine:
        first = await engine.append(Record("k", 1))
    async with open_ledger(config(), storage=storage) as engine:
        assert engine.state.length == 1
        second = await engine.append(Record("k", 2))
        assert second.seq == 1
        assert second.timestamp >= first.timestamp
        assert await engine.verify() == second.hash
    assert genesis("test") != second.hash


async def test_wait_length_follows_commits_and_ends_with_the_ledger() -> None:
    async with open_ledger(config()) as engine:
        seen: list[int] = []

        async def follower() -> None:
            length = 0
            while True:
                length = await engine.wait_length(length + 1)
                seen.append(length)

        with pytest.raises(ValueError, match="wait_length needs an int >= 0, got -1"):
            await engine.wait_length(-1)
        assert await engine.wait_length(0) == 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower)
            await engine.append(Record("k", 1))
            await trio.testing.wait_all_tasks_blocked()
            await engine.append_many([Record("k", 2), Record("k", 3)])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert seen == [1, 3]

        async def waiter() -> None:
            with pytest.raises(LifecycleError, match=r"will not grow: it is STOPPED with 3"):
                await engine.wait_length(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await engine.stop_all()


# -- review finding 7. Errors at the public boundary
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


# Regression: review 7: Errors at the public boundary
async def test_a_failing_wall_clock_fails_that_append_like_a_bad_reading() -> None:
    """A wall_clock returning a bad value fails the append with NucleusError and the ledger
    goes on; one that raises kills the pipeline task and the whole ledger instead."""
    async with open_ledger(config(wall_clock=flaky_wall_clock())) as engine:
        await engine.append(Record("k", 1))
        with pytest.raises(NucleusError, match="wall_clock"):
            await engine.append(Record("k", 2))
        assert (await engine.append(Record("k", 3))).seq == 1


# Regression: review 7: Errors at the public boundary
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


# -- review finding 9: storage outcome unknown
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


# Regression: review 9: an unknown storage outcome is said and the chain resyncs
async def test_storage_outcome_unknown_is_said_and_the_chain_resyncs() -> None:
    storage = LyingStorage()
    async with open_ledger(config(), storage=storage) as engine:
        await engine.append(Record("k", 0))
        storage.lie_on = 1
        with pytest.raises(CommitUnknown, match=r"could not tell whether it was stored"):
            await engine.append(Record("k", 1))
        # The batch did land: the next append continues after it instead of colliding.
        receipt = await engine.append(Record("k", 2))
        assert receipt.seq == 2
        assert [e.record.payload async for e in engine.read()] == [0, 1, 2]
        assert await engine.verify() == receipt.hash
