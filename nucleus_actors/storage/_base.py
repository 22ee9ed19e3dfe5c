"""The `StorageBackend` protocol every ledger store implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from ..record import Entry, Hash

__all__ = [
    "CursorStore",
    "IdempotencyRecord",
    "IdempotencyStore",
    "StorageBackend",
    "StorageBatch",
    "TreeStore",
    "TreeTile",
    "check_range",
]

TILE_WIDTH = 256
"""Hashes in a full tree tile (C2SP tlog-tiles)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TreeTile:
    """Up to 256 consecutive Merkle node hashes of one tree level (C2SP tlog-tiles shape)."""

    level: int
    """Tile level L >= 0: its hashes are nodes of tree level 8*L (level 0 holds leaf hashes)."""
    index: int
    """Tile index N >= 0: it holds the nodes 256*N .. 256*N + width - 1 of its tree level."""
    hashes: bytes
    """`width` 32-byte hashes concatenated, 1 <= width <= 256. A partial tile (width < 256) is
    replaced when a wider tile with the same (level, index) is stored."""

    @property
    def width(self) -> int:
        """Number of hashes in the tile."""
        return len(self.hashes) // 32


@dataclass(frozen=True, kw_only=True, slots=True)
class IdempotencyRecord:
    """What an idempotent append stored under its key, to answer a retry with the same key."""

    key: str
    """The client's idempotency key (unique within one ledger)."""
    fingerprint: str
    """Hex digest of the request that used the key; a different request with it is refused."""
    first_seq: int
    """Seq of the first entry the request appended."""
    count: int
    """Number of entries the request appended (seqs first_seq .. first_seq + count - 1)."""
    created: int
    """When the key was committed, UTC microseconds since the Unix epoch (window expiry)."""


_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, kw_only=True, slots=True)
class StorageBatch:
    """Everything one group commit stores, atomically: all of it or none of it."""

    entries: Sequence[Entry]
    """New entries, contiguous with the stored head (may be empty: a cursors-only batch)."""
    cursors: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    """Module id -> highest seq that module processed (upserted; needs `CursorStore`)."""
    tree: Sequence[TreeTile] = ()
    """Merkle tree tiles to upsert (needs `TreeStore`)."""
    idempotency: Sequence[IdempotencyRecord] = ()
    """Idempotency keys committed with the entries (needs `IdempotencyStore`)."""


@runtime_checkable
class StorageBackend(Protocol):
    """Where a ledger keeps its entries. The engine is the only writer while it is open.

    The engine groups appends (group commit) and hands each batch to `append` once; a backend
    commits each batch atomically and durably. Reads may run concurrently with appends and see a
    prefix of the ledger.
    """

    async def open(self, ledger_id: str) -> None:
        """Create the store for `ledger_id`, or check an existing one belongs to it.

        Raises:
            StorageError: the store belongs to another ledger, is held by another writer, has
                an unknown format, or cannot be opened.
        """
        ...

    async def head(self) -> tuple[int, Hash]:
        """`(length, head hash)`; `(0, genesis(ledger_id))` for an empty ledger."""
        ...

    async def append(self, entries: Sequence[Entry]) -> None:
        """Store `entries` atomically: all or none, durable on return.

        `entries[0].seq` equals the current length and seqs are contiguous.

        Raises:
            StorageError: nothing of the batch was stored.
        """
        ...

    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries with `start <= seq < stop` in seq order (`stop=None`: to the head).

        Raises:
            IntegrityError: a stored entry cannot be decoded (names its seq).
        """
        ...

    async def close(self) -> None:
        """Release the store (idempotent)."""
        ...


def check_range(start: int, stop: int | None) -> None:
    """Validate `read` arguments.

    Raises:
        ValueError: `start` is not an int >= 0, or `stop` is neither None nor an int >= start.
    """
    if type(start) is not int or start < 0:
        raise ValueError(f"read start must be an int >= 0, got {start!r}")
    if stop is not None and (type(stop) is not int or stop < start):
        raise ValueError(f"read stop must be None or an int >= start ({start}), got {stop!r}")


@runtime_checkable
class CursorStore(Protocol):
    """Capability: the backend keeps durable modules' cursors (`StorageBatch.cursors`)."""

    async def load_cursors(self) -> dict[str, int]:
        """Every stored cursor: module id -> highest seq processed."""
        ...


@runtime_checkable
class TreeStore(Protocol):
    """Capability: the backend keeps Merkle tree tiles (`StorageBatch.tree`)."""

    async def read_tiles(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], TreeTile]:
        """The stored tiles among `keys` (`(level, index)` pairs); missing ones are absent."""
        ...


@runtime_checkable
class IdempotencyStore(Protocol):
    """Capability: the backend keeps idempotency keys (`StorageBatch.idempotency`)."""

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        """The record stored under `key`, or `None`."""
        ...

    async def prune_idempotency(self, created_before: int) -> int:
        """Delete keys committed before `created_before` (UTC microseconds); returns how many."""
        ...
