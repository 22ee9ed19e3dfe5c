"""SQLite file formats: a committed file of every earlier format migrates on open (each step in
its own transaction, logged) and verifies with `verify_file`; a newer file is refused."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from nucleus_actors import Hash, LedgerConfig, Record, StorageError, open_ledger
from nucleus_actors.storage import (
    IdempotencyRecord,
    SQLiteStorage,
    StorageBatch,
    TreeTile,
    verify_file,
)
from nucleus_actors.storage import sqlite as sqlite_module

DATA = Path(__file__).parents[1] / "data"
FORMATS = sorted(int(p.stem.rsplit("-", 1)[1]) for p in DATA.glob("ledger-format-*.db"))


def _facts(version: int) -> dict[str, Any]:
    facts: dict[str, Any] = json.loads((DATA / f"ledger-format-{version}.json").read_text())
    return facts


def _copy(version: int, tmp_path: Path) -> Path:
    """A private copy of the committed file (opening it writes -wal/-shm next to it)."""
    path = tmp_path / f"format-{version}.db"
    shutil.copyfile(DATA / f"ledger-format-{version}.db", path)
    return path


def _sql(path: Path, statement: str) -> list[Any]:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(statement).fetchall()
    finally:
        conn.close()


def test_every_earlier_format_has_a_committed_file() -> None:
    assert list(range(1, SQLiteStorage.FORMAT_VERSION)) == FORMATS


@pytest.mark.parametrize("version", FORMATS)
async def test_verify_file_reads_a_committed_file_without_changing_it(
    version: int, tmp_path: Path
) -> None:
    facts = _facts(version)
    path = _copy(version, tmp_path)
    before = path.read_bytes()
    length, head = await verify_file(path)
    assert (length, head.hex()) == (facts["length"], facts["head"])
    assert path.read_bytes() == before  # read-only: not migrated
    assert _sql(path, "SELECT value FROM meta WHERE key = 'format_version'") == [(str(version),)]


@pytest.mark.parametrize("version", FORMATS)
async def test_opening_a_committed_file_migrates_it_step_by_step(
    version: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    facts = _facts(version)
    path = _copy(version, tmp_path)
    caplog.set_level(logging.INFO, logger="nucleus_actors.storage.sqlite")
    config = LedgerConfig(ledger_id=facts["ledger_id"])
    async with open_ledger(config, storage=SQLiteStorage(path)) as ledger:
        assert (ledger.state.length, ledger.state.head.hex()) == (facts["length"], facts["head"])
        assert await ledger.verify() == Hash.from_hex(facts["head"])
        receipt = await ledger.append(Record("after.migration", {"n": 1}))
        assert receipt.seq == facts["length"]
        storage = ledger.storage
        assert isinstance(storage, SQLiteStorage)
        # the new tables work
        key = IdempotencyRecord(key="k", fingerprint="f", first_seq=0, count=1, created=5)
        await storage.append(StorageBatch(entries=[], cursors={"m": 3}))
        await storage.append(StorageBatch(entries=[], idempotency=[key]))
        assert await storage.load_cursors() == {"m": 3}
        assert await storage.get_idempotency("k") == key
        # the engine built the Merkle tree tiles the old file lacked, and kept them up to date
        tiles = await storage.read_tiles([(0, 0)])
        assert isinstance(tiles[(0, 0)], TreeTile)
        assert tiles[(0, 0)].width == facts["length"] + 1
        assert await ledger.root() == await ledger.root(facts["length"] + 1)
    steps = [r.getMessage() for r in caplog.records if "migrating format" in r.getMessage()]
    assert steps == [
        f"ledger file {path}: migrating format {v - 1} -> {v}: {m.what}"
        for m in sqlite_module._MIGRATIONS
        if (v := m.version) > version
    ]
    assert any(
        f"now format {SQLiteStorage.FORMAT_VERSION}" in r.getMessage() for r in caplog.records
    )
    meta = dict(_sql(path, "SELECT key, value FROM meta"))
    assert meta["format_version"] == str(SQLiteStorage.FORMAT_VERSION)
    assert meta["migrated_by"].startswith("nucleus_actors")
    assert meta["ledger_id"] == facts["ledger_id"]
    assert (await verify_file(path))[0] == facts["length"] + 1
    # a second open has nothing to migrate
    caplog.clear()
    storage = SQLiteStorage(path)
    await storage.open(facts["ledger_id"])
    await storage.close()
    assert not [r for r in caplog.records if "migrating" in r.getMessage()]


async def test_a_failing_step_leaves_the_file_at_the_last_completed_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _copy(1, tmp_path)

    def broken(conn: sqlite3.Connection, progress: Any) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise sqlite3.OperationalError("disk I/O error")

    steps = (*sqlite_module._MIGRATIONS, sqlite_module._Migration(3, "broken step", broken))
    monkeypatch.setattr(sqlite_module, "_MIGRATIONS", steps)
    monkeypatch.setattr(sqlite_module, "FORMAT_VERSION", 3)
    with pytest.raises(StorageError, match=r"open failed: disk I/O error"):
        await SQLiteStorage(path).open("format-1")
    tables = {row[0] for row in _sql(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert "half_done" not in tables  # the failed step rolled back
    assert {"cursors", "tree_tiles", "idempotency"} <= tables  # step 2 committed on its own
    assert _sql(path, "SELECT value FROM meta WHERE key = 'format_version'") == [("2",)]
    monkeypatch.undo()
    storage = SQLiteStorage(path)  # the next open goes on from there
    await storage.open("format-1")
    assert (await storage.head())[0] == 33
    await storage.close()


async def test_a_long_step_logs_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = _copy(1, tmp_path)

    def long(conn: sqlite3.Connection, progress: Any) -> None:
        for done in range(0, 101, 25):
            progress(done, 100)

    steps = (*sqlite_module._MIGRATIONS, sqlite_module._Migration(3, "long step", long))
    monkeypatch.setattr(sqlite_module, "_MIGRATIONS", steps)
    monkeypatch.setattr(sqlite_module, "FORMAT_VERSION", 3)
    monkeypatch.setattr(sqlite_module, "_PROGRESS_EVERY", 0.0)  # log every report
    caplog.set_level(logging.INFO, logger="nucleus_actors.storage.sqlite")
    storage = SQLiteStorage(path)
    await storage.open("format-1")
    await storage.close()
    lines = [r.getMessage() for r in caplog.records if "migration to format 3" in r.getMessage()]
    assert lines == [
        f"ledger file {path}: migration to format 3: {n} of 100 done ({n}%)"
        for n in (0, 25, 50, 75, 100)
    ]
    assert _sql(path, "SELECT value FROM meta WHERE key = 'format_version'") == [("3",)]


async def test_a_new_file_is_created_at_the_current_format(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    storage = SQLiteStorage(path)
    await storage.open("fresh")
    await storage.close()
    tables = {row[0] for row in _sql(path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "entries", "cursors", "tree_tiles", "idempotency"}
    meta = dict(_sql(path, "SELECT key, value FROM meta"))
    assert meta["format_version"] == str(SQLiteStorage.FORMAT_VERSION)
    assert "migrated_by" not in meta
