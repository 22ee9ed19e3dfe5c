"""MemoryStorage: the StorageBackend contract, in memory."""

from __future__ import annotations

import pytest

from nucleus_actors import Entry, IntegrityError, Record, StorageError
from nucleus_actors.hashing import canonical_bytes, chain_hash, genesis, leaf_hash
from nucleus_actors.storage import MemoryStorage, StorageBackend, StorageBatch


def _batch(ledger_id: str, start: int, n: int, prev: bytes | None = None) -> list[Entry]:
    head = genesis(ledger_id) if prev is None else prev
    out = []
    for seq in range(start, start + n):
        record = Record("k", {"n": seq}, seq=seq, timestamp=seq)
        data = canonical_bytes(record)
        head = chain_hash(head, seq, leaf_hash(data))
        out.append(Entry(seq, record, head, data))
    return out


async def test_protocol_and_roundtrip() -> None:
    storage = MemoryStorage()
    assert isinstance(storage, StorageBackend)
    await storage.open("alpha")
    assert await storage.head() == (0, genesis("alpha"))
    batch = _batch("alpha", 0, 3)
    await storage.append(StorageBatch(entries=batch))
    assert await storage.head() == (3, batch[-1].hash)
    assert [e async for e in storage.read(0)] == batch
    assert [e.seq async for e in storage.read(1, 2)] == [1]
    assert [e.seq async for e in storage.read(2, 99)] == [2]
    assert [e async for e in storage.read(5)] == []
    await storage.close()
    await storage.close()  # idempotent


async def test_reopen_continues_and_binds_ledger_id() -> None:
    storage = MemoryStorage()
    await storage.open("alpha")
    await storage.append(StorageBatch(entries=_batch("alpha", 0, 2)))
    with pytest.raises(StorageError, match="already open by another engine"):
        await storage.open("alpha")
    await storage.close()
    with pytest.raises(StorageError, match="belongs to ledger 'alpha', cannot open it as 'beta'"):
        await storage.open("beta")
    await storage.open("alpha")
    assert (await storage.head())[0] == 2


async def test_append_must_be_contiguous_and_open() -> None:
    storage = MemoryStorage()
    with pytest.raises(StorageError, match="not open"):
        await storage.append(StorageBatch(entries=_batch("alpha", 0, 1)))
    await storage.open("alpha")
    with pytest.raises(StorageError, match="entry seq 1, expected 0"):
        await storage.append(StorageBatch(entries=_batch("alpha", 1, 1)))
    assert (await storage.head())[0] == 0


async def test_bad_read_ranges() -> None:
    storage = MemoryStorage()
    await storage.open("alpha")
    with pytest.raises(ValueError, match="start must be an int >= 0, got -1"):
        [e async for e in storage.read(-1)]
    with pytest.raises(ValueError, match=r"stop must be None or an int >= start \(3\), got 1"):
        [e async for e in storage.read(3, 1)]


async def test_undecodable_entry_raises_integrity_error_on_read() -> None:
    storage = MemoryStorage()
    await storage.open("alpha")
    await storage.append(StorageBatch(entries=_batch("alpha", 0, 3)))
    storage._tamper(1, canonical=b"\xff garbage")
    with pytest.raises(IntegrityError, match="entry 1") as info:
        [e async for e in storage.read(0)]
    assert info.value.seq == 1
