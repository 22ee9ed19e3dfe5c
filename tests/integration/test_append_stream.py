"""The pipeline and an `AppendStreams` backend: large group commits are handed to storage slice
by slice while they are hashed; a caller withdrawn meanwhile, or a failed commit, leaves
nothing of the batch stored and the chain whole."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from nucleus_actors import LedgerConfig, Record, StorageError, open_ledger
from nucleus_actors._pipeline import HASH_SLICE, STREAM_MIN
from nucleus_actors.hashing import genesis, leaf_hash, merkle_root, verify_entries
from nucleus_actors.record import Entry
from nucleus_actors.storage import AppendStream, AppendStreams, MemoryStorage, StorageBatch


class StreamingMemory(MemoryStorage):
    """MemoryStorage with `append_stream`: fed entries are held until `commit`, which stores
    the batch through `append` (or fails, nothing stored, when `fail_commits` says so)."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[_Stream] = []
        self.fed = trio.Event()  # set at the first slice fed
        self.fail_commits = 0
        self.appends: list[int] = []

    async def append(self, batch: StorageBatch) -> None:
        self.appends.append(len(batch.entries))
        await super().append(batch)

    @asynccontextmanager
    async def append_stream(self) -> AsyncIterator[AppendStream]:
        stream = _Stream(self)
        self.streams.append(stream)
        try:
            yield stream
        finally:
            stream.ended = True


class _Stream:
    def __init__(self, storage: StreamingMemory) -> None:
        self.storage = storage
        self.slices: list[int] = []
        self.entries: list[Entry] = []
        self.committed = False
        self.ended = False

    def feed(self, entries: Sequence[Entry]) -> None:
        assert not self.ended
        self.slices.append(len(entries))
        self.entries.extend(entries)
        self.storage.fed.set()

    async def commit(self, batch: StorageBatch) -> None:
        assert list(batch.entries) == self.entries
        if self.storage.fail_commits:
            self.storage.fail_commits -= 1
            raise StorageError("commit refused by the test (nothing stored)")
        await self.storage.append(batch)
        self.committed = True


async def _check(ledger: Any, storage: MemoryStorage) -> list[Entry]:
    entries = [entry async for entry in storage.read(0, ledger.state.length)]
    assert [e.seq for e in entries] == list(range(len(entries)))
    assert verify_entries(entries, prev=genesis(ledger.config.ledger_id)) == ledger.state.head
    leaves = [leaf_hash(e.canonical) for e in entries]
    assert await ledger.root() == merkle_root(leaves)
    return entries


async def test_a_large_group_commit_is_streamed_slice_by_slice() -> None:
    storage = StreamingMemory()
    assert isinstance(storage, AppendStreams)
    async with open_ledger(LedgerConfig(ledger_id="s"), storage=storage) as ledger:
        await ledger.append(Record("warm", 0))
        receipts = await ledger.append_many([Record("k", n) for n in range(1000)])
        assert [r.seq for r in receipts] == list(range(1, 1001))
        await ledger.append_many([Record("k", n) for n in range(STREAM_MIN - 1)])
        [stream] = storage.streams
        assert stream.committed
        assert stream.slices == [HASH_SLICE] * 7 + [1000 - 7 * HASH_SLICE]
        # the small batches went through append; the streamed one through its commit
        assert storage.appends == [1, 1000, STREAM_MIN - 1]
        await _check(ledger, storage)


async def test_a_caller_withdrawn_while_its_batch_is_streamed_is_not_stored() -> None:
    storage = StreamingMemory()
    async with open_ledger(LedgerConfig(ledger_id="s"), storage=storage) as ledger:
        await ledger.append(Record("warm", 0))
        results: dict[str, Any] = {}
        scope = trio.CancelScope()

        async def append(name: str) -> None:
            results[name] = await ledger.append_many([Record(name, n) for n in range(500)])

        async def withdrawn() -> None:
            with scope:
                await append("a")
            results.setdefault("a", "cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(withdrawn)
            nursery.start_soon(append, "b")
            await storage.fed.wait()  # the batch (a and b) is being streamed
            scope.cancel()
        assert results["a"] == "cancelled"
        assert [r.seq for r in results["b"]] == list(range(1, 501))
        # the stream was abandoned (never committed); b alone was then encoded again and
        # stored through append
        assert [s.committed for s in storage.streams] == [False]
        assert storage.streams[0].ended
        assert storage.appends == [1, 500]
        entries = await _check(ledger, storage)
        assert {e.record.kind for e in entries[1:]} == {"b"}


async def test_a_failed_streamed_commit_fails_its_appends_and_the_chain_goes_on() -> None:
    storage = StreamingMemory()
    storage.fail_commits = 1
    async with open_ledger(LedgerConfig(ledger_id="s"), storage=storage) as ledger:
        await ledger.append(Record("warm", 0))
        with pytest.raises(StorageError, match=r"append failed, nothing stored: commit refused"):
            await ledger.append_many([Record("lost", n) for n in range(400)])
        receipts = await ledger.append_many([Record("kept", n) for n in range(400)])
        assert receipts[0].seq == 1
        entries = await _check(ledger, storage)
        assert len(entries) == 401
        assert {e.record.kind for e in entries[1:]} == {"kept"}
