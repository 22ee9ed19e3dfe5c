"""Batching: concurrent appends travel together through hooks and storage (group commit)."""

from __future__ import annotations

import trio
import trio.lowlevel
import trio.testing

from nucleus_actors import Hash, LedgerConfig, Module, Record, RecordRejected, open_ledger
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
