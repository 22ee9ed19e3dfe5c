"""SQLiteStorage: the StorageBackend contract on disk, reopen, tampering, locking, failures.

SQLite runs in worker threads, so these tests use trio's real clock, with small sizes.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from nucleus_actors import (
    Entry,
    Hash,
    IntegrityError,
    LedgerConfig,
    LedgerEngine,
    Module,
    Record,
    StorageError,
    open_ledger,
)
from nucleus_actors.hashing import canonical_bytes, chain_hash, genesis, leaf_hash
from nucleus_actors.storage import SQLiteStorage, StorageBackend, StorageBatch, verify_file


def _batch(ledger_id: str, start: int, n: int, prev: bytes | None = None) -> list[Entry]:
    head = genesis(ledger_id) if prev is None else prev
    out = []
    for seq in range(start, start + n):
        record = Record("k", {"n": seq, "text": "x" * (seq % 7)}, seq=seq, timestamp=1000 + seq)
        data = canonical_bytes(record)
        head = chain_hash(head, seq, leaf_hash(data))
        out.append(Entry(seq, record, head, data))
    return out


def _sql(path: Path, statement: str, *args: Any) -> list[Any]:
    """Run one statement on the file directly, as an attacker or a broken disk would."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(statement, args).fetchall()
    finally:
        conn.close()


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


async def _fill(path: Path, n: int, ledger_id: str = "orders") -> list[Entry]:
    storage = SQLiteStorage(path)
    await storage.open(ledger_id)
    batch = _batch(ledger_id, 0, n)
    await storage.append(StorageBatch(entries=batch))
    await storage.close()
    return batch


# -- the StorageBackend contract ---------------------------------------------------------------


async def test_protocol_roundtrip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    storage = SQLiteStorage(path)
    assert isinstance(storage, StorageBackend)
    assert storage.path == path
    assert storage.lock_path == tmp_path / "ledger.db.lock"
    await storage.open("alpha")
    assert await storage.head() == (0, genesis("alpha"))
    first = _batch("alpha", 0, 3)
    await storage.append(StorageBatch(entries=first))
    await storage.append(StorageBatch(entries=[]))  # an empty batch is a no-op
    assert await storage.head() == (3, first[-1].hash)
    assert [e async for e in storage.read(0)] == first
    assert [e.seq async for e in storage.read(1, 2)] == [1]
    assert [e.seq async for e in storage.read(2, 99)] == [2]
    assert [e async for e in storage.read(5)] == []
    with pytest.raises(ValueError, match=r"read start must be an int >= 0, got -1"):
        storage.read(-1)
    await storage.close()
    await storage.close()  # idempotent
    assert repr(storage).endswith("full closed>")

    # The same object and a new one both reopen the file and continue the chain.
    await storage.open("alpha")
    assert await storage.head() == (3, first[-1].hash)
    await storage.close()
    again = SQLiteStorage(str(path))
    await again.open("alpha")
    second = _batch("alpha", 3, 2, prev=first[-1].hash)
    await again.append(StorageBatch(entries=second))
    assert [e async for e in again.read(0)] == first + second
    await again.close()
    meta = dict(_sql(path, "SELECT key, value FROM meta"))
    assert meta.pop("created_by").startswith("nucleus_actors ")
    assert meta == {
        "format_version": str(SQLiteStorage.FORMAT_VERSION),
        "hash_scheme": "blake3-jcs-chain/1",
        "ledger_id": "alpha",
    }
    assert _sql(path, "PRAGMA journal_mode") == [("wal",)]


async def test_exact_canonical_bytes_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    batch = await _fill(path, 2)
    rows = _sql(path, "SELECT seq, canonical, hash FROM entries ORDER BY seq")
    assert rows == [(e.seq, e.canonical, bytes(e.hash)) for e in batch]


async def test_read_streams_in_chunks_and_stops_at_the_head_when_it_began(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    storage = SQLiteStorage(path)
    await storage.open("alpha")
    batch = _batch("alpha", 0, 1200)  # more than two 512-row chunks
    await storage.append(StorageBatch(entries=batch[:1100]))
    seen = []
    async for entry in storage.read(0):
        if entry.seq == 0:
            await storage.append(
                StorageBatch(entries=batch[1100:])
            )  # appended after the read began
        seen.append(entry.seq)
    assert seen == list(range(1100))
    assert [e.seq async for e in storage.read(1090, 1105)] == list(range(1090, 1105))
    await storage.close()


async def test_append_must_be_contiguous_and_open(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "ledger.db")
    with pytest.raises(
        StorageError, match=r"cannot append: SQLiteStorage .*ledger\.db is not open"
    ):
        await storage.append(StorageBatch(entries=_batch("alpha", 0, 1)))
    with pytest.raises(StorageError, match=r"cannot read the head: .* is not open"):
        await storage.head()
    await storage.open("alpha")
    with pytest.raises(StorageError, match=r"already open"):
        await storage.open("alpha")
    with pytest.raises(StorageError, match=r"append out of order: entry seq 1, expected 0"):
        await storage.append(StorageBatch(entries=_batch("alpha", 1, 1)))
    gap = _batch("alpha", 0, 3)
    with pytest.raises(StorageError, match=r"append out of order: entry seq 2, expected 1"):
        await storage.append(StorageBatch(entries=[gap[0], gap[2]]))
    assert (await storage.head())[0] == 0
    await storage.close()
    with pytest.raises(StorageError, match=r"cannot read: .* is not open"):
        storage.read(0)


async def test_a_reader_of_a_closed_storage_fails_cleanly(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "ledger.db")
    await storage.open("alpha")
    await storage.append(StorageBatch(entries=_batch("alpha", 0, 600)))
    reader = storage.read(0)
    assert (await reader.__anext__()).seq == 0
    await storage.close()
    with pytest.raises(StorageError, match=r"was closed"):
        async for _ in reader:
            pass


def test_constructor_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"durability must be 'full' or 'normal', got 'FULL'"):
        SQLiteStorage(tmp_path / "x.db", durability="FULL")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs a file path, got ':memory:'.*MemoryStorage"):
        SQLiteStorage(":memory:")
    with pytest.raises(ValueError, match=r"needs a file path, got ''"):
        SQLiteStorage("")
    with pytest.raises(TypeError, match=r"must be a str or os.PathLike, got 3"):
        SQLiteStorage(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("durability", "pragma"), [("full", 2), ("normal", 1)])
async def test_durability_sets_synchronous(tmp_path: Path, durability: Any, pragma: int) -> None:
    storage = SQLiteStorage(tmp_path / "ledger.db", durability=durability)
    await storage.open("alpha")
    conn = storage._conn
    assert conn is not None
    value = await storage._hop("probe", lambda: conn.execute("PRAGMA synchronous").fetchone()[0])
    assert value == pragma
    await storage.close()


# -- opening the wrong thing -------------------------------------------------------------------


async def test_wrong_ledger_id_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 1, "orders")
    storage = SQLiteStorage(path)
    with pytest.raises(
        StorageError,
        match=rf"ledger file {path} belongs to ledger 'orders', cannot open it as ledger 'audit'",
    ):
        await storage.open("audit")
    # A refused open holds nothing: the right ledger opens at once.
    await storage.open("orders")
    await storage.close()


async def test_wrong_ledger_id_through_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)):
        pass
    with pytest.raises(StorageError, match=r"belongs to ledger 'orders'.*as ledger 'audit'"):
        async with open_ledger(LedgerConfig(ledger_id="audit"), storage=SQLiteStorage(path)):
            pass  # pragma: no cover


async def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 1)
    newer = SQLiteStorage.FORMAT_VERSION + 1
    _sql(path, f"UPDATE meta SET value = '{newer}' WHERE key = 'format_version'")
    with pytest.raises(
        StorageError,
        match=rf"ledger file {path} has format version {newer}, newer than this build of "
        rf"nucleus_actors reads \(format versions 1 to {newer - 1}\).*upgrade nucleus_actors",
    ):
        await SQLiteStorage(path).open("orders")
    with pytest.raises(StorageError, match=rf"has format version {newer}, newer"):
        await verify_file(path)
    _sql(path, "UPDATE meta SET value = 'x1' WHERE key = 'format_version'")
    with pytest.raises(StorageError, match=r"has format version 'x1', which no release"):
        await SQLiteStorage(path).open("orders")


async def test_unknown_hash_scheme_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 1)
    _sql(path, "UPDATE meta SET value = 'sha256/9' WHERE key = 'hash_scheme'")
    with pytest.raises(StorageError, match=r"uses hash scheme 'sha256/9'; this build .* computes"):
        await SQLiteStorage(path).open("orders")


async def test_files_that_are_not_ledgers_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database at all, just text " * 100)
    with pytest.raises(StorageError, match=r"garbage\.db: open failed: file is not a database"):
        await SQLiteStorage(garbage).open("orders")
    other = tmp_path / "other.db"
    _sql(other, "CREATE TABLE users (name TEXT)")
    with pytest.raises(StorageError, match=r"other\.db is an SQLite database but not a .*'users'"):
        await SQLiteStorage(other).open("orders")
    missing_dir = tmp_path / "no" / "such" / "dir" / "ledger.db"
    with pytest.raises(StorageError, match=r"cannot open ledger file .*ledger\.db: cannot create"):
        await SQLiteStorage(missing_dir).open("orders")


# -- tampering ---------------------------------------------------------------------------------


async def _verify_with_engine(path: Path) -> Hash:
    async with LedgerEngine(LedgerConfig(ledger_id="orders"), SQLiteStorage(path)) as engine:
        return await engine.verify()


@pytest.mark.parametrize("column", ["canonical", "hash"])
async def test_tampering_a_middle_entry_is_named_by_verify(tmp_path: Path, column: str) -> None:
    path = tmp_path / "ledger.db"
    batch = await _fill(path, 8)
    assert await _verify_with_engine(path) == batch[-1].hash
    (value,) = _sql(path, f"SELECT {column} FROM entries WHERE seq = 5")[0]
    # Flip a bit of a payload digit ('5' -> '4' keeps valid JSON) or of the hash.
    index = value.index(b'"n":5') + 4 if column == "canonical" else 7
    _sql(path, f"UPDATE entries SET {column} = ? WHERE seq = 5", _flip(value, index))
    with pytest.raises(IntegrityError, match=r"entry 5: chain hash mismatch") as info:
        await _verify_with_engine(path)
    assert info.value.seq == 5
    with pytest.raises(IntegrityError, match=r"entry 5") as info:
        await verify_file(path)
    assert info.value.seq == 5


async def test_undecodable_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 4)
    _sql(path, "UPDATE entries SET canonical = ? WHERE seq = 2", b'{"kind":')
    with pytest.raises(IntegrityError, match=r"entry 2: canonical bytes are not JSON") as info:
        await _verify_with_engine(path)
    assert info.value.seq == 2
    _sql(path, "UPDATE entries SET canonical = 'text' WHERE seq = 2")
    with pytest.raises(IntegrityError, match=r"entry 2: stored canonical bytes .* must be BLOBs"):
        await verify_file(path)


async def test_missing_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 6)
    _sql(path, "DELETE FROM entries WHERE seq = 3")
    with pytest.raises(IntegrityError, match=r"entry 3 is missing from storage") as info:
        await _verify_with_engine(path)
    assert info.value.seq == 3
    with pytest.raises(IntegrityError, match=r"entry 3 is missing"):
        await verify_file(path)
    _sql(path, "DELETE FROM entries WHERE seq = 0")
    with pytest.raises(IntegrityError, match=r"entry 0 is missing .*first stored seq is 1"):
        await SQLiteStorage(path).open("orders")


@pytest.mark.parametrize("column", ["canonical", "hash"])
async def test_tampered_tail_fails_open(tmp_path: Path, column: str) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 3)
    (value,) = _sql(path, f"SELECT {column} FROM entries WHERE seq = 2")[0]
    index = value.index(b'"n":2') + 4 if column == "canonical" else 0
    _sql(path, f"UPDATE entries SET {column} = ? WHERE seq = 2", _flip(value, index))
    storage = SQLiteStorage(path)
    with pytest.raises(IntegrityError, match=r"entry 2: chain hash mismatch") as info:
        await storage.open("orders")
    assert info.value.seq == 2
    # The failed open released the lock: a second attempt fails the same way, not "locked".
    with pytest.raises(IntegrityError, match=r"entry 2"):
        await SQLiteStorage(path).open("orders")


async def test_tampered_single_entry_fails_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await _fill(path, 1)
    (value,) = _sql(path, "SELECT hash FROM entries WHERE seq = 0")[0]
    _sql(path, "UPDATE entries SET hash = ? WHERE seq = 0", _flip(value, 31))
    with pytest.raises(IntegrityError, match=r"entry 0: chain hash mismatch"):
        await SQLiteStorage(path).open("orders")


# -- one writer --------------------------------------------------------------------------------


async def test_second_writer_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as one:
        await one.append(Record("k", {"n": 1}))
        with pytest.raises(
            StorageError,
            match=rf"ledger file {path} is already open for writing \(its lock "
            rf"{path}\.lock is held",
        ):
            async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)):
                pass  # pragma: no cover
        await one.append(Record("k", {"n": 2}))  # the first writer is unaffected
        assert await one.verify() == one.state.head
    # Released on close: the next engine continues the chain.
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as two:
        assert two.state.length == 2
        await two.verify()


_TRY_OPEN = textwrap.dedent(
    """
    import sys, trio
    from nucleus_actors import StorageError
    from nucleus_actors.storage import SQLiteStorage

    async def main():
        storage = SQLiteStorage(sys.argv[1])
        try:
            await storage.open("orders")
        except StorageError as exc:
            print("refused:", exc)
            return
        print("opened")
        await storage.close()

    trio.run(main)
    """
)

_HOLD_OPEN = textwrap.dedent(
    """
    import sys, trio
    from nucleus_actors.storage import SQLiteStorage

    async def main():
        storage = SQLiteStorage(sys.argv[1])
        await storage.open("orders")
        print("holding", flush=True)
        await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    storage = SQLiteStorage(path)
    await storage.open("orders")
    result = await trio.run_process(
        [sys.executable, "-c", _TRY_OPEN, str(path)], capture_stdout=True, check=True
    )
    assert result.stdout.decode().startswith(f"refused: ledger file {path} is already open")
    await storage.close()
    result = await trio.run_process(
        [sys.executable, "-c", _TRY_OPEN, str(path)], capture_stdout=True, check=True
    )
    assert result.stdout.decode() == "opened\n"


async def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _HOLD_OPEN, str(path)], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        out = b""
        while b"holding\n" not in out:
            chunk = await proc.stdout.receive_some()
            assert chunk, "the holder exited early"
            out += chunk
        with pytest.raises(StorageError, match=r"is already open for writing"):
            await SQLiteStorage(path).open("orders")
    finally:
        proc.kill()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()
    storage = SQLiteStorage(path)
    await storage.open("orders")  # the OS dropped the dead process's flock
    await storage.close()


# -- failures during a batch -------------------------------------------------------------------


class _FullDisk(sqlite3.Connection):
    """A connection whose COMMIT fails while `fail` is set, as on a full disk."""

    fail = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and _FullDisk.fail:
            raise sqlite3.OperationalError("database or disk is full")
        return super().execute(sql, *args)


class _FlakyStorage(SQLiteStorage):
    _factory = _FullDisk


@pytest.fixture
def full_disk() -> Any:
    _FullDisk.fail = False
    yield _FullDisk
    _FullDisk.fail = False


async def test_failed_batch_is_rolled_back_and_later_batches_work(
    tmp_path: Path, full_disk: Any
) -> None:
    path = tmp_path / "ledger.db"
    storage = _FlakyStorage(path)
    await storage.open("alpha")
    batch = _batch("alpha", 0, 6)
    await storage.append(StorageBatch(entries=batch[:2]))
    full_disk.fail = True
    with pytest.raises(StorageError, match=r"append failed: database or disk is full") as info:
        await storage.append(StorageBatch(entries=batch[2:5]))
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert await storage.head() == (2, batch[1].hash)
    assert [e.seq async for e in storage.read(0)] == [0, 1]
    full_disk.fail = False
    await storage.append(StorageBatch(entries=batch[2:6]))
    assert [e async for e in storage.read(0)] == batch
    await storage.close()
    assert _sql(path, "SELECT count(*) FROM entries") == [(6,)]


async def test_real_sqlite_full_error_then_space_comes_back(tmp_path: Path) -> None:
    # max_page_count makes SQLite itself report SQLITE_FULL when the file would grow.
    path = tmp_path / "ledger.db"
    storage = SQLiteStorage(path)
    await storage.open("alpha")
    conn = storage._conn
    assert conn is not None
    pages = await storage._hop("probe", lambda: conn.execute("PRAGMA page_count").fetchone()[0])
    await storage._hop("cap", conn.execute, f"PRAGMA max_page_count = {pages + 1}")
    big = [
        Entry(e.seq, e.record, e.hash, e.canonical)
        for e in _batch("alpha", 0, 200)  # ~10 pages of rows: does not fit in one more page
    ]
    with pytest.raises(StorageError, match=r"database or disk is full"):
        await storage.append(StorageBatch(entries=big))
    assert await storage.head() == (0, genesis("alpha"))
    await storage._hop("uncap", conn.execute, "PRAGMA max_page_count = 1073741823")
    await storage.append(StorageBatch(entries=big))
    assert await storage.head() == (200, big[-1].hash)
    await storage.close()


class _Seen(Module):
    id = "seen"

    def __init__(self) -> None:
        self.seqs: list[int] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert record.seq is not None
        self.seqs.append(record.seq)


async def test_storage_failure_through_the_engine(tmp_path: Path, full_disk: Any) -> None:
    path = tmp_path / "ledger.db"
    seen = _Seen()
    async with open_ledger(
        LedgerConfig(ledger_id="orders"), storage=_FlakyStorage(path), modules=[seen]
    ) as engine:
        await engine.append(Record("k", {"n": 0}))
        full_disk.fail = True
        with pytest.raises(StorageError, match=r"nothing stored: .*database or disk is full"):
            await engine.append(Record("k", {"n": 1}))
        with pytest.raises(StorageError, match=r"database or disk is full"):
            await engine.append_many([Record("k", {"n": 2}), Record("k", {"n": 3})])
        assert engine.state.length == 1
        await engine.verify()
        full_disk.fail = False
        receipt = await engine.append(Record("k", {"n": 4}))
        assert receipt.seq == 1
        assert (await engine.get(1)).record.payload == {"n": 4}
        assert await engine.verify() == receipt.hash
        assert await engine.modules.get(_Seen).ask(lambda m: list(m.seqs)) == [0, 1]
    assert await verify_file(path) == (2, receipt.hash)


# -- group commit and verify_file --------------------------------------------------------------


class _Counting(SQLiteStorage):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.batches: list[int] = []

    async def append(self, batch: StorageBatch) -> None:
        await super().append(batch)
        self.batches.append(len(batch.entries))


async def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    storage = _Counting(tmp_path / "ledger.db")
    receipts = []
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=storage) as engine:

        async def writer(n: int) -> None:
            for i in range(5):
                receipts.append(await engine.append(Record("k", {"w": n, "i": i})))

        async with trio.open_nursery() as nursery:
            for n in range(32):
                nursery.start_soon(writer, n)
        assert await engine.verify() == engine.state.head
    assert sum(storage.batches) == 160
    assert len(storage.batches) < 160  # appends waiting for a commit went in together
    async with open_ledger(
        LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(storage.path)
    ) as e:
        for receipt in receipts:
            assert (await e.get(receipt.seq)).hash == receipt.hash


async def test_verify_file_beside_a_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    progress: list[tuple[int, int]] = []
    async with open_ledger(LedgerConfig(ledger_id="orders"), storage=SQLiteStorage(path)) as engine:
        await engine.append_many([Record("k", {"n": n}) for n in range(1100)])
        async with trio.open_nursery() as nursery:

            async def keep_writing() -> None:
                while True:
                    await engine.append(Record("k", {"more": True}))

            nursery.start_soon(keep_writing)
            length, head = await verify_file(path, progress=lambda *a: progress.append(a))
            nursery.cancel_scope.cancel()
        assert length >= 1100
        assert head == (await engine.get(length - 1)).hash
        assert progress[-1] == (length, length)
        assert [done for done, _ in progress] == sorted({done for done, _ in progress})
        assert all(total == length for _, total in progress)
        assert len(progress) >= 3  # one call per chunk


async def test_verify_file_of_empty_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    storage = SQLiteStorage(path)
    await storage.open("orders")
    await storage.close()
    calls: list[tuple[int, int]] = []
    assert await verify_file(path, progress=lambda *a: calls.append(a)) == (0, genesis("orders"))
    assert calls == [(0, 0)]
    with pytest.raises(StorageError, match=r"cannot verify ledger file .*nope\.db: no such file"):
        await verify_file(tmp_path / "nope.db")
