"""The engine notices when storage's head is no longer its own (issue 15 §1).

Something else wrote to the ledger's storage (a second writer that got past the locks, a
restore under a running ledger): the engine's next append fails, and then the engine either
continues from storage's head, when it extends the chain it committed (adopting and delivering
those entries), or fails the ledger loudly (`LedgerFailed`, phase FAILED), when the chain it
committed is gone. Never "every append fails while the ledger looks RUNNING".
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Entry,
    Hash,
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    LifecycleError,
    Module,
    Phase,
    Record,
    StorageError,
    open_ledger,
)
from nucleus_actors.hashing import canonical_bytes, chain_hash, genesis, leaf_hash
from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBatch


def _entries(start: int, n: int, prev: Hash, kind: str = "foreign") -> list[Entry]:
    out = []
    for seq in range(start, start + n):
        record = Record(kind, {"n": seq}, seq=seq, timestamp=10_000 + seq)
        data = canonical_bytes(record)
        prev = chain_hash(prev, seq, leaf_hash(data))
        out.append(Entry(seq, record, prev, data))
    return out


class Seen(Module):
    id = "seen"

    def __init__(self) -> None:
        self.kinds: list[tuple[int, str]] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert record.seq is not None
        self.kinds.append((record.seq, record.kind))


async def test_entries_written_behind_the_engine_that_extend_its_chain_are_adopted() -> None:
    storage = MemoryStorage()
    seen = Seen()
    async with open_ledger(
        LedgerConfig(ledger_id="orders"), storage=storage, modules=[seen]
    ) as ledger:
        first = await ledger.append(Record("own", {"n": 0}))
        # another writer appends two entries continuing the chain
        await storage.append(StorageBatch(entries=_entries(1, 2, first.hash)))
        with pytest.raises(StorageError, match=r"append failed, nothing stored: append out"):
            await ledger.append(Record("own", {"n": 1}))
        assert ledger.state.length == 3  # adopted at once, not at the next append
        assert ledger.phase is Phase.RUNNING
        receipt = await ledger.append(Record("own", {"n": 2}))
        assert receipt.seq == 3
        assert await ledger.verify() == receipt.hash
        # the Merkle tree covers the adopted entries too (their tiles were built on adoption)
        for seq in range(4):
            (await ledger.inclusion_proof(seq)).verify()
        kinds = await ledger.modules.get(Seen).ask(lambda m: list(m.kinds))
    assert kinds == [(0, "own"), (1, "foreign"), (2, "foreign"), (3, "own")]


async def test_a_storage_that_lost_committed_entries_fails_the_ledger_loudly() -> None:
    storage = MemoryStorage()
    engine = LedgerEngine(LedgerConfig(ledger_id="orders"), storage)
    with pytest.raises(LedgerFailed, match=r"its storage no longer holds the chain") as info:
        async with engine:
            await engine.init_all()
            await engine.start_all()
            for n in range(3):
                await engine.append(Record("own", {"n": n}))
            # the storage is rolled back to one entry, then another writer appends two others
            del storage._rows[1:]
            storage._head = Hash(storage._rows[0][1])
            await storage.append(StorageBatch(entries=_entries(1, 2, storage._head)))
            # refused (the batch does not chain to storage's head), then the ledger fails:
            # the block is cancelled and leaving it raises LedgerFailed
            await engine.append(Record("own", {"n": 3}))
            await trio.sleep_forever()  # pragma: no cover
    assert engine.phase is Phase.FAILED
    assert "storage head (3, " in str(info.value)
    assert "a second writer" in str(info.value)
    with pytest.raises(LifecycleError):
        await engine.append(Record("own", {"n": 4}))


def _sql(path: Path, statement: str, rows: list[tuple[object, ...]] | None = None) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if rows is None:
            conn.execute(statement)
        else:
            conn.executemany(statement, rows)
    finally:
        conn.close()


async def test_sqlite_rows_written_by_another_writer_are_adopted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as led:
        first = await led.append(Record("own", {"n": 0}))
        rows = [(e.seq, e.canonical, bytes(e.hash)) for e in _entries(1, 3, first.hash)]
        await trio.to_thread.run_sync(
            _sql, path, "INSERT INTO entries (seq, canonical, hash) VALUES (?, ?, ?)", rows
        )
        with pytest.raises(
            StorageError, match=r"nothing stored: .*the file's last entry changed behind this"
        ):
            await led.append(Record("own", {"n": 1}))
        assert led.state.length == 4
        assert (await led.append(Record("own", {"n": 2}))).seq == 4
        await led.verify()


async def test_sqlite_rows_overwritten_by_another_writer_fail_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    engine = LedgerEngine(LedgerConfig(ledger_id="orders"), SQLiteStorage(path))
    with pytest.raises(LedgerFailed, match=r"storage head \(2, .*\) is not the ledger's head"):
        async with engine:
            await engine.init_all()
            await engine.start_all()
            for n in range(2):
                await engine.append(Record("own", {"n": n}))
            # the second writer's WAL replaced both entries (issue 15: hard link, two WALs)
            other = [(e.seq, e.canonical, bytes(e.hash)) for e in _entries(0, 2, genesis("orders"))]
            await trio.to_thread.run_sync(_sql, path, "DELETE FROM entries")
            await trio.to_thread.run_sync(
                _sql, path, "INSERT INTO entries (seq, canonical, hash) VALUES (?, ?, ?)", other
            )
            await engine.append(Record("own", {"n": 2}))
    assert engine.phase is Phase.FAILED
