"""The storage contract (v2): `StorageBackend`, the `StorageBatch` it commits, capabilities.

A backend implements `StorageBackend` (open, head, append a `StorageBatch`, read, close) and
declares `storage_contract = 2`. Features that store more than entries need a *capability*, a
separate protocol the backend implements too: `CursorStore` (durable modules' cursors),
`TreeStore` (Merkle tree tiles, for proofs), `IdempotencyStore` (idempotency keys). The engine
checks the contract when it opens the storage (`check_contract`) and a capability when a
feature is used (`require_capability`). See docs/storage.md, "Writing a backend".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar, cast, runtime_checkable

from ..errors import IntegrityError, StorageError
from ..hashing import ChainVerifier, genesis
from ..record import Entry, Hash

__all__ = [
    "CAPABILITIES",
    "STORAGE_CONTRACT",
    "AppendStream",
    "AppendStreams",
    "CursorStore",
    "IdempotencyRecord",
    "IdempotencyStore",
    "StorageBackend",
    "StorageBatch",
    "TreeStore",
    "TreeTile",
    "check_batch",
    "check_contract",
    "check_range",
    "require_capability",
]

STORAGE_CONTRACT: Final = 2
"""The storage contract version this build speaks: `append(batch: StorageBatch)`."""

DOCS: Final = "docs/storage.md, 'Writing a backend'"

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

    def __post_init__(self) -> None:
        if type(self.level) is not int or self.level < 0:
            raise ValueError(f"TreeTile level must be an int >= 0, got {self.level!r}")
        if type(self.index) is not int or self.index < 0:
            raise ValueError(f"TreeTile index must be an int >= 0, got {self.index!r}")
        if not isinstance(self.hashes, bytes):
            raise TypeError(f"TreeTile hashes must be bytes, got {type(self.hashes).__name__}")
        size = len(self.hashes)
        if size % 32 or not 1 <= size // 32 <= TILE_WIDTH:
            raise ValueError(
                f"TreeTile hashes must be 1 to {TILE_WIDTH} 32-byte hashes, got {size} bytes"
            )

    @property
    def width(self) -> int:
        """Number of hashes in the tile."""
        return len(self.hashes) // 32

    @property
    def key(self) -> tuple[int, int]:
        """`(level, index)`: what identifies the tile in storage."""
        return self.level, self.index


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

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"IdempotencyRecord key must be a non-empty str, got {self.key!r}")
        for name in ("first_seq", "created"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"IdempotencyRecord {name} must be an int >= 0, got {value!r}")
        if type(self.count) is not int or self.count < 1:
            raise ValueError(f"IdempotencyRecord count must be an int >= 1, got {self.count!r}")


class _NoCursors(Mapping[str, int]):
    """The empty, immutable and hashable mapping a batch without cursors carries (a hashable
    default is cheaper to construct a batch with than a default_factory)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"


_EMPTY: Mapping[str, int] = _NoCursors()


@dataclass(frozen=True, kw_only=True, slots=True)
class StorageBatch:
    """Everything one group commit stores, atomically: all of it or none of it.

    The engine builds one per group commit and hands it to `StorageBackend.append`. A backend
    stores every part in one transaction, or refuses the whole batch (nothing stored). A part
    that is not empty needs its capability (`CursorStore`, `TreeStore`, `IdempotencyStore`).
    """

    entries: Sequence[Entry]
    """New entries, contiguous with the stored head (may be empty: a cursors-only batch)."""
    cursors: Mapping[str, int] = _EMPTY
    """Module id -> highest seq that module processed (upserted; needs `CursorStore`)."""
    tree: Sequence[TreeTile] = ()
    """Merkle tree tiles to upsert by (level, index); a wider tile replaces a partial one, a
    narrower one never replaces a wider one (needs `TreeStore`)."""
    idempotency: Sequence[IdempotencyRecord] = ()
    """Idempotency keys committed with the entries; a record replaces one stored earlier under
    the same key (needs `IdempotencyStore`)."""
    prev: Hash | None = None
    """The head the batch was built on: the chain hash its first entry is chained to (the
    engine sets it). A backend whose stored head differs refuses the batch (another writer
    was here); None: not checked."""

    @property
    def empty(self) -> bool:
        """Nothing to store at all (no entries, cursors, tiles or keys)."""
        return not (self.entries or self.cursors or self.tree or self.idempotency)


@runtime_checkable
class StorageBackend(Protocol):
    """Where a ledger keeps its entries. The engine is the only writer while it is open.

    The engine groups appends (group commit) and hands each batch to `append` once; a backend
    commits each batch atomically and durably. Reads may run concurrently with appends and see a
    prefix of the ledger.

    Contract v2 (this one): `append` takes a `StorageBatch`, and the class says so with
    `storage_contract = 2`. A v1 backend (`append(entries)`, no `storage_contract`) is refused
    when the engine opens it, with an error naming v2 (see `check_contract`).
    """

    @property
    def storage_contract(self) -> int:
        """The contract version the backend implements: `2` (a class attribute will do)."""
        ...

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

    async def append(self, batch: StorageBatch) -> None:
        """Store `batch` atomically (entries, cursors, tiles, keys): all or none, durable on
        return.

        `batch.entries[0].seq` equals the current length and seqs are contiguous. A batch with
        no entries may still carry cursors (and must still be stored).

        Raises:
            StorageError: nothing of the batch was stored (including a part whose capability
                the backend lacks). CommitUnknown: the backend cannot tell whether the batch
                was stored (the engine then re-reads the head).
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


def check_batch(
    batch: StorageBatch, length: int, head: Hash | None = None, *, backend: object = None
) -> int:
    """Check a batch against a store holding `length` entries; return the length after it.

    What every backend checks before it stores anything (`MemoryStorage` and `SQLiteStorage`
    call it): entry seqs run on from `length`; with `head` (the stored head hash), a batch
    whose `prev` is another head (built by a writer that no longer knows the store) is
    refused; each cursor names a module (a non-empty str) and a seq `-1 <= seq < new
    length`; each idempotency record covers stored
    seqs; each tree tile holds only complete nodes of the tree after the batch (tile `(L, N)`
    of width `w` needs `256 * N + w <= new_length >> (8 * L)`, as C2SP tlog-tiles). With
    `backend`, a part whose capability the backend lacks is refused (never dropped silently).

    Raises:
        StorageError: the first rule broken, with the offending value; nothing may be stored.
    """
    if type(batch) is not StorageBatch and not isinstance(batch, StorageBatch):
        raise StorageError(
            f"append takes a StorageBatch (storage contract v{STORAGE_CONTRACT}), got "
            f"{type(batch).__name__}"
        )
    entries = batch.entries
    seq = length
    for entry in entries:
        if entry.seq != seq:
            raise StorageError(f"append out of order: entry seq {entry.seq}, expected {seq}")
        seq += 1
    after = seq
    if head is not None and batch.prev is not None and batch.prev != head:
        raise StorageError(
            f"append does not continue the stored chain: the batch was built on head "
            f"{batch.prev.hex()}, the stored head is {head.hex()}; has another writer written "
            "to this store?"
        )
    cursors = batch.cursors
    if cursors is _EMPTY and not batch.tree and not batch.idempotency:
        return after  # the common case: entries only
    if backend is not None:
        for part, capability in (
            ("cursors", CursorStore),
            ("tree", TreeStore),
            ("idempotency", IdempotencyStore),
        ):
            if getattr(batch, part) and not isinstance(backend, capability):
                raise StorageError(
                    f"storage backend {_name(backend)} lacks the {capability.__name__} "
                    f"capability: it cannot store the batch's {part}; see {DOCS}"
                )
    for module_id, cursor in cursors.items():
        if not isinstance(module_id, str) or not module_id:
            raise StorageError(f"cursor module id must be a non-empty str, got {module_id!r}")
        if type(cursor) is not int or not -1 <= cursor < after:
            raise StorageError(
                f"cursor of module {module_id!r} must be an int from -1 to {after - 1} (the "
                f"last seq after this batch), got {cursor!r}"
            )
    for record in batch.idempotency:
        if record.first_seq + record.count > after:
            raise StorageError(
                f"idempotency key {record.key!r} covers seqs {record.first_seq} to "
                f"{record.first_seq + record.count - 1}, beyond the last seq {after - 1}"
            )
    for tile in batch.tree:
        complete = after >> (8 * tile.level)
        if TILE_WIDTH * tile.index + tile.width > complete:
            raise StorageError(
                f"tree tile (level {tile.level}, index {tile.index}, width {tile.width}) "
                f"holds nodes beyond the {complete} complete nodes of its tree level for "
                f"{after} entries"
            )
    return after


BatchRows = tuple[
    list[tuple[int, bytes, bytes]],
    list[tuple[str, int]],
    list[tuple[int, int, bytes]],
    list[tuple[str, str, int, int, int]],
]
"""A batch as rows for a backend's tables: entries `(seq, canonical, hash)`, cursors
`(module, seq)`, tiles `(level, index, hashes)` and keys `(key, fingerprint, first_seq, count,
created)`."""


def batch_rows(batch: StorageBatch, *, entries: bool = True) -> BatchRows:
    """The rows a backend inserts or upserts to store `batch` (see `BatchRows`); with
    `entries=False` no entry rows (a backend that wrote them already)."""
    return (
        [(entry.seq, entry.canonical, bytes(entry.hash)) for entry in batch.entries]
        if entries
        else [],
        list(batch.cursors.items()),
        [(tile.level, tile.index, tile.hashes) for tile in batch.tree],
        [(r.key, r.fingerprint, r.first_seq, r.count, r.created) for r in batch.idempotency],
    )


def decode_tiles(
    rows: Sequence[tuple[int, int, Any]], where: str
) -> dict[tuple[int, int], TreeTile]:
    """Stored tile rows `(level, index, hashes)` as `TreeTile`s by `(level, index)`.

    Raises:
        IntegrityError: a stored tile is not a valid tile (not a whole number of 32-byte
            hashes, ...); the message starts with `where`, the store.
    """
    tiles: dict[tuple[int, int], TreeTile] = {}
    for level, index, hashes in rows:
        try:
            tiles[level, index] = TreeTile(level=level, index=index, hashes=hashes)
        except (TypeError, ValueError) as exc:
            raise IntegrityError(
                f"{where}: stored tree tile ({level}, {index}) is invalid: {exc}",
                seq=(index * 256) << (8 * level),
            ) from exc
    return tiles


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


CAPABILITIES: Final = (CursorStore, TreeStore, IdempotencyStore)
"""Every capability protocol, in documentation order."""


@runtime_checkable
class AppendStream(Protocol):
    """One batch on its way into storage, given entry by entry (`AppendStreams`)."""

    def feed(self, entries: Sequence[Entry]) -> None:
        """Hand the next entries of the batch, in order (no checkpoint)."""
        ...

    async def commit(self, batch: StorageBatch) -> None:
        """Commit `batch`, whose entries are exactly those fed, in order, as `append(batch)`
        would (same rules, same errors); a batch that is not is refused (`StorageError`,
        nothing stored)."""
        ...


@runtime_checkable
class AppendStreams(Protocol):
    """Optional speed-up: the backend can write a batch while its entries are still being
    hashed. The engine uses it for large group commits when the backend has it; nothing
    requires it, and a backend without it gets the same batches through `append`."""

    def append_stream(self) -> AbstractAsyncContextManager[AppendStream]:
        """A block in which entries are `feed`-ed and the batch `commit`-ed; leaving it
        without `commit` stores nothing."""
        ...


_C = TypeVar("_C")


def _name(storage: object) -> str:
    cls = type(storage)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_contract(storage: object) -> None:
    """Check that `storage` implements storage contract v2 (the engine calls it at open).

    A backend declares the contract with `storage_contract = 2` (`MemoryStorage` and
    `SQLiteStorage` do, and so does any subclass of them). A backend written for v1 (its
    `append` takes a list of entries, it has no `storage_contract`) is refused here rather than
    failing on its first append.

    Raises:
        StorageError: `storage` is not a storage backend, or implements another contract
            version (the message names the backend, v2 and the docs).
    """
    missing = [
        name for name in ("open", "head", "append", "read", "close")
        if not callable(getattr(storage, name, None))
    ]  # fmt: skip
    if missing:
        raise StorageError(
            f"{_name(storage)} is not a storage backend: it has no {', '.join(missing)} "
            f"(a backend implements the StorageBackend protocol, storage contract "
            f"v{STORAGE_CONTRACT}; see {DOCS})"
        )
    version = getattr(storage, "storage_contract", None)
    if version == STORAGE_CONTRACT and type(version) is int:
        return
    if version is None:
        raise StorageError(
            f"storage backend {_name(storage)} implements storage contract v1 (it has no "
            f"`storage_contract` attribute; its append takes a list of entries); this version "
            f"of nucleus_actors needs storage contract v{STORAGE_CONTRACT}: "
            "`append(batch: StorageBatch)` storing batch.entries (and any cursors, tree tiles "
            f"and idempotency keys) atomically, and `storage_contract = {STORAGE_CONTRACT}` on "
            f"the class; see {DOCS}"
        )
    raise StorageError(
        f"storage backend {_name(storage)} implements storage contract {version!r}; this "
        f"version of nucleus_actors speaks storage contract v{STORAGE_CONTRACT} only; see {DOCS}"
    )


def require_capability(storage: object, capability: Callable[..., _C], feature: str) -> _C:
    """`storage` typed as `capability`, or a clear error naming what is missing.

    Args:
        storage: the backend.
        capability: `CursorStore`, `TreeStore` or `IdempotencyStore`.
        feature: what needs it, for the message (e.g. "register durable module 'audit'").

    Raises:
        StorageError: the backend does not implement `capability` (the message names the
            backend, the capability, its missing methods and the feature).
        TypeError: `capability` is not one of the capability protocols.
    """
    if capability not in CAPABILITIES:
        names = ", ".join(c.__name__ for c in CAPABILITIES)
        raise TypeError(f"require_capability takes one of {names}, got {capability!r}")
    protocol = cast("type[object]", capability)
    if isinstance(storage, protocol):
        return cast("_C", storage)
    methods = [
        name
        for name in ("load_cursors", "read_tiles", "get_idempotency", "prune_idempotency")
        if hasattr(protocol, name) and not callable(getattr(storage, name, None))
    ]
    raise StorageError(
        f"cannot {feature}: storage backend {_name(storage)} lacks the {protocol.__name__} "
        f"capability (missing {', '.join(methods)}); use a backend that implements it "
        f"(MemoryStorage and SQLiteStorage do; see {DOCS})"
    )


_Row = TypeVar("_Row", bound=Sequence[object])


def check_tail(
    ledger_id: str, tail: Sequence[_Row], first: object, entry: Callable[[_Row], Entry]
) -> tuple[int, Hash]:
    """`(length, head)` after checking seqs run from 0 and the last entry's chain hash.

    For a backend's open: `tail` is its newest two rows (newest first, `row[0]` the seq),
    `first` its smallest stored seq, `entry` how it decodes a row.
    """
    if not tail:
        return 0, genesis(ledger_id)
    if first != 0:
        raise IntegrityError(
            f"entry 0 is missing from storage (first stored seq is {first})", seq=0
        )
    if len(tail) == 1:
        verifier = ChainVerifier(genesis(ledger_id), 0)
    else:
        before = entry(tail[1])
        if tail[0][0] != before.seq + 1:
            raise IntegrityError(
                f"entry {before.seq + 1} is missing from storage (next stored seq is {tail[0][0]})",
                seq=before.seq + 1,
            )
        verifier = ChainVerifier(before.hash, before.seq + 1)
    last = verifier.feed(entry(tail[0]))
    return verifier.length, last
