"""Storage contract v2: the engine builds one StorageBatch per group commit, refuses v1 backends
at open, and checks capabilities with a clear error."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import Entry, Hash, LedgerConfig, LedgerEngine, Record, StorageError
from nucleus_actors.hashing import genesis
from nucleus_actors.storage import (
    CAPABILITIES,
    STORAGE_CONTRACT,
    CursorStore,
    IdempotencyStore,
    MemoryStorage,
    SQLiteStorage,
    StorageBackend,
    StorageBatch,
    TreeStore,
    check_contract,
    require_capability,
)


class V1Storage:
    """A third-party backend written against storage contract v1: append takes entries."""

    def __init__(self) -> None:
        self.opened = False
        self.rows: list[Entry] = []

    async def open(self, ledger_id: str) -> None:
        self.opened = True
        self.ledger_id = ledger_id

    async def head(self) -> tuple[int, Hash]:
        return len(self.rows), self.rows[-1].hash if self.rows else genesis(self.ledger_id)

    async def append(self, entries: Sequence[Entry]) -> None:
        self.rows.extend(entries)

    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class EntriesOnly(MemoryStorage):
    """A v2 backend that implements no capability (only entries)."""

    load_cursors = None  # type: ignore[assignment]
    read_tiles = None  # type: ignore[assignment]
    get_idempotency = None  # type: ignore[assignment]
    prune_idempotency = None  # type: ignore[assignment]


class Recording(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[StorageBatch] = []

    async def append(self, batch: StorageBatch) -> None:
        self.batches.append(batch)
        await super().append(batch)


async def test_a_v1_backend_is_refused_at_open_naming_v2_and_the_docs() -> None:
    storage = V1Storage()
    engine = LedgerEngine(LedgerConfig(ledger_id="orders"), storage)  # type: ignore[arg-type]
    with pytest.raises(
        StorageError,
        match=r"storage backend .*V1Storage implements storage contract v1 .*needs storage "
        r"contract v2: `append\(batch: StorageBatch\)`.*docs/storage.md, 'Writing a backend'",
    ):
        async with engine:
            pass  # pragma: no cover
    assert not storage.opened  # refused before it was opened
    assert not isinstance(storage, StorageBackend)


def test_check_contract_names_a_wrong_version_and_a_non_backend() -> None:
    class Future(MemoryStorage):
        storage_contract = 3

    with pytest.raises(StorageError, match=r"implements storage contract 3; .*v2 only"):
        check_contract(Future())
    with pytest.raises(StorageError, match=r"builtins.object is not a storage backend: it has no"):
        check_contract(object())
    check_contract(MemoryStorage())
    check_contract(SQLiteStorage("x.db"))  # construction touches nothing
    assert MemoryStorage.storage_contract == SQLiteStorage.storage_contract == STORAGE_CONTRACT == 2


async def test_the_pipeline_hands_one_storage_batch_per_group_commit() -> None:
    storage = Recording()
    async with LedgerEngine(LedgerConfig(ledger_id="orders"), storage) as engine:
        await engine.init_all()
        await engine.start_all()
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(engine.append, Record("k", {"n": n}))
        await engine.append_many([Record("k", {"n": n}) for n in range(3)])
    assert all(type(batch) is StorageBatch for batch in storage.batches)
    assert sum(len(batch.entries) for batch in storage.batches) == 23
    assert len(storage.batches) < 21  # concurrent appends shared batches
    assert [len(b.entries) for b in storage.batches][-1] == 3  # append_many: one batch


def test_memory_and_sqlite_implement_every_capability() -> None:
    for storage in (MemoryStorage(), SQLiteStorage("x.db")):
        for capability in CAPABILITIES:
            assert isinstance(storage, capability)
            assert require_capability(storage, capability, "test") is storage


async def test_a_missing_capability_is_refused_naming_backend_capability_and_feature() -> None:
    storage = EntriesOnly()
    async with LedgerEngine(LedgerConfig(ledger_id="orders"), storage) as engine:
        with pytest.raises(
            StorageError,
            match=r"cannot register durable module 'audit': storage backend "
            r"\S*test_storage_contract.EntriesOnly lacks the CursorStore capability "
            r"\(missing load_cursors\)",
        ):
            engine.require_storage(CursorStore, "register durable module 'audit'")
        with pytest.raises(StorageError, match=r"lacks the TreeStore capability"):
            engine.require_storage(TreeStore, "prove inclusion")
        with pytest.raises(
            StorageError,
            match=r"lacks the IdempotencyStore capability \(missing get_idempotency, "
            r"prune_idempotency\)",
        ):
            engine.require_storage(IdempotencyStore, "append with an idempotency key")
        cursors: Any = engine.require_storage
        with pytest.raises(TypeError, match=r"require_capability takes one of CursorStore"):
            cursors(StorageBackend, "x")
    full = MemoryStorage()
    async with LedgerEngine(LedgerConfig(ledger_id="orders"), full) as engine:
        store = engine.require_storage(CursorStore, "register durable module 'audit'")
        assert await store.load_cursors() == {}
