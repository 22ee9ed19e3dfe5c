"""Batching: concurrent appends travel together through hooks and storage (group commit)."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from nucleus_actors import (
    Hash,
    LedgerConfig,
    Module,
    Record,
    RecordRejected,
    _pipeline,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, StorageBatch


class CountingStorage(MemoryStorage):
    """MemoryStorage that records the size of every batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []

    async def append(self, batch: StorageBatch) -> None:
        self.batches.append([e.seq for e in batch.entries])
        await super().append(batch)


class SlowVeto(Module):
    """Rejects odd payloads; yields on every record so appends pile up behind it."""

    id = "veto"

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def before_append(self, record: Record) -> Record | None:
        await trio.lowlevel.checkpoint()
        self.seen.append(record.payload)
        if record.payload % 2:
            raise RecordRejected("odd")
        return None


class Sink(Module):
    id = "sink"

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert record.seq is not None
        self.seen.append((record.seq, record.payload))


async def test_concurrent_appends_are_group_committed_in_pipeline_order() -> None:
    storage = CountingStorage()
    sink = Sink()
    async with open_ledger(
        LedgerConfig(ledger_id="batch"), storage=storage, modules=[SlowVeto(), sink]
    ) as ledger:
        outcomes: dict[int, object] = {}

        async def one(n: int) -> None:
            try:
                outcomes[n] = await ledger.append(Record("k", n))
            except RecordRejected as exc:
                outcomes[n] = exc

        async with trio.open_nursery() as nursery:
            for n in range(64):
                nursery.start_soon(one, n)
        # Group commit: far fewer storage transactions than appends.
        assert len(storage.batches) < 16
        assert max(len(b) for b in storage.batches) > 1
        # Every even payload stored, every odd one rejected: one veto never fails a neighbour.
        assert sorted(n for n, o in outcomes.items() if isinstance(o, RecordRejected)) == list(
            range(1, 64, 2)
        )
        stored = [e.record.payload async for e in ledger.read()]
        assert sorted(stored) == list(range(0, 64, 2))
        # Commit order is the order records passed the pipeline (the validator's order).
        seen = await ledger.modules.get(SlowVeto).ask(lambda m: list(m.seen))
        assert stored == [n for n in seen if n % 2 == 0]
        # Seqs are contiguous across batches, and deliveries come in commit order.
        assert [s for b in storage.batches for s in b] == list(range(32))
        await trio.testing.wait_all_tasks_blocked()
        assert sink.seen == [(seq, payload) for seq, payload in enumerate(stored)]
        assert await ledger.verify() == ledger.state.head


async def test_a_large_group_commit_yields_while_hashing_and_a_caller_withdrawn_then_is_not_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sequencer checkpoints every HASH_SLICE records while it encodes and hashes a batch;
    a caller cancelled at such a checkpoint is withdrawn (nothing of it is stored) and the
    others' records commit with contiguous seqs."""
    monkeypatch.setattr(_pipeline, "HASH_SLICE", 2)
    storage = CountingStorage()
    async with open_ledger(LedgerConfig(ledger_id="slices"), storage=storage) as ledger:
        await ledger.append(Record("warm.up", 0))  # the next appends travel in one batch
        pipeline = ledger._pipeline
        outcome: dict[str, object] = {}
        ticks = 0

        async def first() -> None:
            outcome["first"] = await ledger.append_many([Record("a.one", n) for n in range(5)])

        async def second(scope: trio.CancelScope) -> None:
            with scope:
                outcome["second"] = await ledger.append_many([Record("b.two", n) for n in range(5)])
            outcome.setdefault("second", "cancelled")

        async def watcher(scope: trio.CancelScope) -> None:
            nonlocal ticks
            while not pipeline._current:  # the batch is taken: encoding runs
                await trio.lowlevel.checkpoint()
            while pipeline._current and not pipeline.storing:
                ticks += 1
                if ticks == 2:
                    scope.cancel()
                await trio.lowlevel.checkpoint()

        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher, scope)
            nursery.start_soon(first)
            nursery.start_soon(second, scope)
        assert ticks >= 2  # the sequencer yielded while encoding
        assert outcome["second"] == "cancelled"
        receipts = outcome["first"]
        assert isinstance(receipts, list)
        assert [r.seq for r in receipts] == [1, 2, 3, 4, 5]
        assert storage.batches[-1] == [1, 2, 3, 4, 5]
        assert ledger.state.length == 6
        kinds = [entry.record.kind async for entry in ledger.read(0)]
        assert kinds == ["warm.up"] + ["a.one"] * 5
        await ledger.append(Record("after", 1))  # the chain goes on from the right head
        assert ledger.state.length == 7
