"""SQLiteStorage serves reads on a connection of their own: they never queue behind a commit.

A commit is held inside its worker thread (a connection whose COMMIT waits for a gate); reads,
capability reads and the engine's `get` complete meanwhile. With one shared connection they
would wait for the commit, which waits for them: the guard below would expire.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from nucleus_actors import Hash, LedgerConfig, Module, ModuleSpec, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage, StorageBatch
from nucleus_actors.testing import make_entries

DEADLOCK_GUARD = 60  # seconds; only reached if a read queues behind the held commit


class _HeldCommit(sqlite3.Connection):
    gate: threading.Event | None = None
    entered = threading.Event()

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        gate = _HeldCommit.gate
        if sql == "COMMIT" and gate is not None:
            _HeldCommit.entered.set()
            gate.wait()
        return super().execute(sql, *args)


class _Held(SQLiteStorage):
    _factory = _HeldCommit


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    _HeldCommit.entered.clear()
    yield event
    event.set()
    _HeldCommit.gate = None


async def test_reads_complete_while_a_commit_is_held(tmp_path: Path, gate: threading.Event) -> None:
    storage = _Held(tmp_path / "ledger.db")
    await storage.open("conformance")
    first = make_entries("conformance", 0, 600)
    await storage.append(StorageBatch(entries=first, cursors={"m": 599}))
    second = make_entries("conformance", 600, 5, first[-1].hash)
    _HeldCommit.gate = gate
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.append, StorageBatch(entries=second))
        await trio.to_thread.run_sync(_HeldCommit.entered.wait)  # the commit is in its thread
        with trio.move_on_after(DEADLOCK_GUARD) as guard:
            read = [entry async for entry in storage.read(0)]
            cursors = await storage.load_cursors()
            tiles = await storage.read_tiles([(0, 0)])
            key = await storage.get_idempotency("k")
        gate.set()
    assert not guard.cancelled_caught, "a read waited for the commit in progress"
    assert read == first  # the held batch is not visible before it commits
    assert (cursors, tiles, key) == ({"m": 599}, {}, None)
    assert [e async for e in storage.read(600)] == second
    await storage.close()


async def test_engine_get_completes_while_a_commit_is_held(
    tmp_path: Path, gate: threading.Event
) -> None:
    async with open_ledger(
        LedgerConfig(ledger_id="orders"), storage=_Held(tmp_path / "ledger.db")
    ) as ledger:
        receipt = await ledger.append(Record("k", {"n": 0}))
        _HeldCommit.gate = gate
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ledger.append, Record("k", {"n": 1}))
            await trio.to_thread.run_sync(_HeldCommit.entered.wait)
            with trio.move_on_after(DEADLOCK_GUARD) as guard:
                entry = await ledger.get(0)
            gate.set()
        assert not guard.cancelled_caught, "get() waited for the commit in progress"
        assert entry.hash == receipt.hash
        assert ledger.state.length == 2


class _Seqs(Module):
    id = "catching-up"

    def __init__(self) -> None:
        self.seqs: list[int] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert record.seq is not None
        self.seqs.append(record.seq)


async def test_a_durable_catch_up_completes_while_a_commit_is_held(
    tmp_path: Path, gate: threading.Event
) -> None:
    """Catch-up reads go through the read connection: a durable module added while a group
    commit is held in its thread still reads back the 600 entries before it."""
    async with open_ledger(
        LedgerConfig(ledger_id="orders"), storage=_Held(tmp_path / "ledger.db")
    ) as ledger:
        for start in range(0, 600, 200):
            await ledger.append_many([Record("k", {"n": n}) for n in range(start, start + 200)])
        module = _Seqs()
        _HeldCommit.gate = gate
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ledger.append, Record("k", {"n": 600}))
            await trio.to_thread.run_sync(_HeldCommit.entered.wait)
            with trio.move_on_after(DEADLOCK_GUARD) as guard:
                handle = await ledger.add(ModuleSpec(module, durable=True))
                await handle.ask(lambda m: None)  # answered once caught up to length 600
                caught_up = list(module.seqs)
            gate.set()
        assert not guard.cancelled_caught, "the catch-up waited for the commit in progress"
        assert caught_up == list(range(600))
        await handle.ask(lambda m: None)
        assert module.seqs == list(range(601))
