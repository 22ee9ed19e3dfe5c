"""`MemoryStorage`: the default backend, keeping entries in process memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

import trio

from ..errors import StorageError
from ..hashing import decode_entry, genesis
from ..record import Entry, Hash
from ._base import (
    STORAGE_CONTRACT,
    IdempotencyRecord,
    StorageBatch,
    TreeTile,
    check_batch,
    check_range,
)

__all__ = ["MemoryStorage"]

_YIELD_EVERY = 256


class _Reader:
    __slots__ = ("_end", "_next", "_rows", "_start")

    def __init__(self, rows: list[tuple[bytes, Hash]], start: int, end: int) -> None:
        self._rows = rows
        self._start = start
        self._next = start
        self._end = end

    def __aiter__(self) -> _Reader:
        return self

    async def __anext__(self) -> Entry:
        seq = self._next
        if seq >= self._end:
            raise StopAsyncIteration
        if (seq - self._start) % _YIELD_EVERY == 0:
            await trio.lowlevel.checkpoint()
        self._next = seq + 1
        canonical, digest = self._rows[seq]
        return decode_entry(seq, canonical, digest)


class MemoryStorage:
    """Entries in a list in memory: fast, and gone when the process ends.

    Like a file, one `MemoryStorage` can be opened again by a later engine (the chain
    continues) but by one engine at a time, and only for the ledger id it was first opened for.
    It stores each entry's exact canonical bytes and chain hash, and decodes records on read.

    Storage contract v2 with every capability: `CursorStore`, `TreeStore`, `IdempotencyStore`.
    """

    storage_contract: ClassVar[int] = STORAGE_CONTRACT
    """Storage contract v2: `append` takes a `StorageBatch`."""

    def __init__(self) -> None:
        self._ledger_id: str | None = None
        self._is_open = False
        self._rows: list[tuple[bytes, Hash]] = []
        self._head: Hash | None = None
        self._cursors: dict[str, int] = {}
        self._tiles: dict[tuple[int, int], TreeTile] = {}
        self._keys: dict[str, IdempotencyRecord] = {}

    async def open(self, ledger_id: str) -> None:
        """Claim the store for `ledger_id` (a checkpoint; nothing to undo if cancelled).

        Raises:
            StorageError: already open, or it holds another ledger.
        """
        await trio.lowlevel.checkpoint()
        if self._is_open:
            raise StorageError(
                f"MemoryStorage of ledger {self._ledger_id!r} is already open by another engine"
            )
        if self._ledger_id is not None and self._ledger_id != ledger_id:
            raise StorageError(
                f"MemoryStorage belongs to ledger {self._ledger_id!r}, cannot open it as "
                f"{ledger_id!r}"
            )
        self._ledger_id = ledger_id
        if self._head is None:
            self._head = genesis(ledger_id)
        self._is_open = True

    def _check_open(self, what: str) -> None:
        if not self._is_open:
            raise StorageError(f"cannot {what}: MemoryStorage is not open")

    async def head(self) -> tuple[int, Hash]:
        """`(length, head hash)`. A checkpoint."""
        await trio.lowlevel.checkpoint()
        self._check_open("read the head")
        assert self._head is not None
        return len(self._rows), self._head

    async def append(self, batch: StorageBatch) -> None:
        """Store a batch (entries, cursors, tiles, keys), atomically: every part is checked
        (`check_batch`, including that the batch was built on the stored head) before
        anything is stored. Never yields to other tasks: it only checks
        for cancellation first (raising `Cancelled` with nothing stored).

        Raises:
            StorageError: not open, or the batch breaks a `check_batch` rule (nothing stored).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open("append")
        check_batch(batch, len(self._rows), self._head, backend=self)
        entries: Sequence[Entry] = batch.entries
        if entries:
            self._rows.extend((entry.canonical, entry.hash) for entry in entries)
            self._head = entries[-1].hash
        if batch.cursors:
            self._cursors.update(batch.cursors)
        for tile in batch.tree:
            old = self._tiles.get(tile.key)
            if old is None or tile.width >= old.width:
                self._tiles[tile.key] = tile
        for record in batch.idempotency:
            self._keys[record.key] = record

    # -- capabilities ----------------------------------------------------------------------
    async def load_cursors(self) -> dict[str, int]:
        """Every stored cursor, module id -> highest seq processed. A checkpoint.

        Raises:
            StorageError: not open.
        """
        await trio.lowlevel.checkpoint()
        self._check_open("load cursors")
        return dict(self._cursors)

    async def read_tiles(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], TreeTile]:
        """The stored tiles among `keys` (`(level, index)`); missing ones are absent. A
        checkpoint.

        Raises:
            StorageError: not open.
        """
        await trio.lowlevel.checkpoint()
        self._check_open("read tree tiles")
        return {key: self._tiles[key] for key in keys if key in self._tiles}

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        """The record stored under `key`, or None. A checkpoint.

        Raises:
            StorageError: not open.
        """
        await trio.lowlevel.checkpoint()
        self._check_open("look up an idempotency key")
        return self._keys.get(key)

    async def prune_idempotency(self, created_before: int) -> int:
        """Delete the keys committed before `created_before` (UTC microseconds); return how
        many. A checkpoint (atomic: no other task runs meanwhile).

        Raises:
            StorageError: not open.
        """
        await trio.lowlevel.checkpoint()
        self._check_open("prune idempotency keys")
        old = [key for key, record in self._keys.items() if record.created < created_before]
        for key in old:
            del self._keys[key]
        return len(old)

    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries `start <= seq < stop` (`None`: up to the head when the read began).

        A plain async iterator (not a generator): breaking out of the loop early needs no
        cleanup. Each step is a checkpoint every 256 entries.

        Raises:
            ValueError: bad range. StorageError: not open. IntegrityError: undecodable entry.
        """
        check_range(start, stop)
        self._check_open("read")
        end = len(self._rows) if stop is None else min(stop, len(self._rows))
        return _Reader(self._rows, start, end)

    async def close(self) -> None:
        """Release the store for the next engine (idempotent, no checkpoint)."""
        self._is_open = False

    # -- test support ----------------------------------------------------------------------
    def _tamper(
        self, seq: int, *, canonical: bytes | None = None, hash: bytes | None = None
    ) -> None:
        """Overwrite a stored field (for tamper-detection tests only)."""
        old_canonical, old_hash = self._rows[seq]
        self._rows[seq] = (
            old_canonical if canonical is None else canonical,
            old_hash if hash is None else Hash(hash),
        )
