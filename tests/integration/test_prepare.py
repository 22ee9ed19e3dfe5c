"""The next batch is hashed while the previous one is stored; nothing prepared on a head that
did not commit ever reaches storage."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import LedgerConfig, Record, StorageError, _pipeline, open_ledger
from nucleus_actors.hashing import genesis, leaf_hash, merkle_root, verify_entries
from nucleus_actors.storage import MemoryStorage, StorageBatch


class GatedStorage(MemoryStorage):
    """MemoryStorage that holds the entry batch starting at a given seq until released (and
    then refuses it, nothing stored, when asked to)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[int]] = []
        self.gates: dict[int, trio.Event] = {}
        self.entered: dict[int, trio.Event] = {}
        self.failing: set[int] = set()
        self.released: dict[int, trio.Event] = {}

    def hold(self, seq: int, *, fail: bool = False) -> None:
        self.gates[seq] = self.released[seq] = trio.Event()
        self.entered[seq] = trio.Event()
        if fail:
            self.failing.add(seq)

    def _release(self, seq: int) -> None:
        self.released[seq].set()

    async def append(self, batch: StorageBatch) -> None:
        first = batch.entries[0].seq if batch.entries else None
        gate = self.gates.pop(first, None) if first is not None else None
        if gate is not None:
            self.entered[first].set()
            await gate.wait()
            if first in self.failing:
                self.failing.discard(first)
                raise StorageError("refused by the test: nothing stored")
        self.batches.append([e.seq for e in batch.entries])
        await super().append(batch)


class Spy:
    """Records what `_take_prepared` returned (was a prepared batch used?)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.used: list[bool] = []
        real = _pipeline.Pipeline._take_prepared

        def take(pipeline: _pipeline.Pipeline, live: list[_pipeline.Request]) -> Any:
            prepared = real(pipeline, live)
            self.used.append(prepared is not None)
            return prepared

        monkeypatch.setattr(_pipeline.Pipeline, "_take_prepared", take)


async def _check_chain_and_tree(ledger: Any, storage: MemoryStorage) -> list[Any]:
    entries = [entry async for entry in storage.read(0, ledger.state.length)]
    assert [e.seq for e in entries] == list(range(len(entries)))
    prev = genesis(ledger.config.ledger_id)
    assert verify_entries(entries, prev=prev) == ledger.state.head
    assert await ledger.verify() == ledger.state.head
    leaves = [leaf_hash(e.canonical) for e in entries]
    assert await ledger.root() == merkle_root(leaves)
    for size in range(1, len(leaves) + 1):  # past roots are read from the stored tiles
        assert await ledger.root(size) == merkle_root(leaves[:size])
    return entries


async def _submit(ledger: Any, results: dict[str, Any], name: str, count: int) -> None:
    try:
        results[name] = await ledger.append_many([Record(name, n) for n in range(count)])
    except Exception as exc:
        results[name] = exc


async def _queue_behind_a_store(
    ledger: Any, storage: GatedStorage, nursery: trio.Nursery, results: dict[str, Any]
) -> None:
    """ "a" (seqs 1-3) is held in storage while "b" (4 records: a batch of its own with
    max_batch=4) and "c" (2) queue; then "a" commits and "b" is held in storage with "c"
    queued behind it: "c" is prepared while "b" is stored."""
    nursery.start_soon(_submit, ledger, results, "a", 3)
    await storage.entered[1].wait()
    nursery.start_soon(_submit, ledger, results, "b", 4)
    await trio.testing.wait_all_tasks_blocked()


async def _commit_a_and_store_b(ledger: Any, storage: GatedStorage) -> Any:
    """Let "a" commit and "b" reach storage (held there); the batch the pipeline prepared from
    what queued behind "b" (hashed while "b" is being stored)."""
    storage._release(1)
    await storage.entered[4].wait()
    await trio.testing.wait_all_tasks_blocked()
    prepared = ledger._pipeline._prepared
    assert prepared is not None
    return prepared


async def test_the_next_batch_is_hashed_during_the_store_and_used_after_the_commit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_pipeline, "HASH_SLICE", 1)  # the preparation yields on every record
    spy = Spy(monkeypatch)
    storage = GatedStorage()
    config = LedgerConfig(ledger_id="prep", max_batch=4)
    async with open_ledger(config, storage=storage) as ledger:
        await ledger.append(Record("warm", 0))
        results: dict[str, Any] = {}
        storage.hold(1)
        storage.hold(4)
        async with trio.open_nursery() as nursery:
            await _queue_behind_a_store(ledger, storage, nursery, results)
            nursery.start_soon(_submit, ledger, results, "c", 2)
            await trio.testing.wait_all_tasks_blocked()
            prepared = await _commit_a_and_store_b(ledger, storage)
            assert prepared.start[0] == 8  # on the head "b" will leave
            assert [e.seq for e in prepared.encoded.entries] == [8, 9]
            nursery.start_soon(_submit, ledger, results, "d", 2)  # arrives after: appended
            await trio.testing.wait_all_tasks_blocked()
            assert storage.batches == [[0], [1, 2, 3]]  # nothing prepared handed to storage
            assert ledger._pipeline.storing
            storage._release(4)
        assert [[r.seq for r in results[k]] for k in "abcd"] == [
            [1, 2, 3],
            [4, 5, 6, 7],
            [8, 9],
            [10, 11],
        ]
        assert storage.batches == [[0], [1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
        assert spy.used[-1] is True  # the prepared batch was stored, "d" on its end
        entries = await _check_chain_and_tree(ledger, storage)
        assert len({e.timestamp for e in entries[8:]}) == 1  # one batch, one timestamp
        assert [e.record.kind for e in entries[8:]] == ["c", "c", "d", "d"]


async def test_a_batch_prepared_on_a_head_that_failed_is_never_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    storage = GatedStorage()
    config = LedgerConfig(ledger_id="prep.fail", max_batch=4)
    async with open_ledger(config, storage=storage) as ledger:
        await ledger.append(Record("warm", 0))
        results: dict[str, Any] = {}
        storage.hold(1)
        storage.hold(4, fail=True)
        async with trio.open_nursery() as nursery:
            await _queue_behind_a_store(ledger, storage, nursery, results)
            nursery.start_soon(_submit, ledger, results, "c", 2)
            await trio.testing.wait_all_tasks_blocked()
            prepared = await _commit_a_and_store_b(ledger, storage)
            assert [e.seq for e in prepared.encoded.entries] == [8, 9]  # after "b"
            storage._release(4)  # "b" fails: nothing stored
        assert isinstance(results["b"], StorageError)
        # "c" was hashed again on the committed head: seqs 4-5, never 8-9.
        assert [r.seq for r in results["c"]] == [4, 5]
        assert storage.batches == [[0], [1, 2, 3], [4, 5]]
        assert spy.used[-1] is False
        entries = await _check_chain_and_tree(ledger, storage)
        assert [e.record.kind for e in entries] == ["warm", "a", "a", "a", "c", "c"]


async def test_a_prepared_caller_cancelled_before_storage_is_withdrawn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spy = Spy(monkeypatch)
    storage = GatedStorage()
    config = LedgerConfig(ledger_id="prep.cancel", max_batch=4)
    async with open_ledger(config, storage=storage) as ledger:
        await ledger.append(Record("warm", 0))
        results: dict[str, Any] = {}
        storage.hold(1)
        storage.hold(4)
        scope = trio.CancelScope()

        async def cancellable() -> None:
            with scope:
                await _submit(ledger, results, "c", 2)
            results.setdefault("c", "cancelled")

        async with trio.open_nursery() as nursery:
            await _queue_behind_a_store(ledger, storage, nursery, results)
            nursery.start_soon(cancellable)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(_submit, ledger, results, "d", 2)
            await trio.testing.wait_all_tasks_blocked()
            prepared = await _commit_a_and_store_b(ledger, storage)
            assert len(prepared.requests) == 2  # "c" and "d"
            scope.cancel()  # "c" withdraws while "b" is being stored
            await trio.testing.wait_all_tasks_blocked()
            storage._release(4)
        assert results["c"] == "cancelled"
        assert [r.seq for r in results["d"]] == [8, 9]
        assert storage.batches == [[0], [1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert spy.used[-1] is False  # its batch changed: encoded again, without "c"
        entries = await _check_chain_and_tree(ledger, storage)
        assert [e.record.kind for e in entries[8:]] == ["d", "d"]
