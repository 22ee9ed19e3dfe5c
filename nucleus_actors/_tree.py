"""The ledger's Merkle tree kept in storage as C2SP tlog-tiles: growth, roots and proofs.

Tile `(L, N)` holds the hashes of tree level `8L` (level 0: leaf hashes) numbered
`256N .. 256N + width - 1`; only complete nodes are stored (C2SP tlog-tiles). A node of height
`h = 8L + r` (`0 <= r < 8`) is the root of `2^r` consecutive hashes inside one tile of level
`L`, so any complete node costs one tile read and at most 127 hashes, and a proof of `O(log n)`
nodes needs `O(log_256 n)` tiles, read in one `read_tiles` call.

`TreeEdge` is the right edge of the tree (the last, partial tile of every level): the pipeline
extends it with each batch's leaves and stores the tiles that changed in the same
`StorageBatch`. Pure and sync (no trio): the engine does the awaiting.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Final

from blake3 import blake3

from .errors import IntegrityError, ProofError
from .proofs import BLAKE3, ConsistencyProof, InclusionProof, consistency_ranges, inclusion_ranges
from .record import Hash
from .storage._base import TILE_WIDTH, StorageBackend, StorageBatch, TreeStore, TreeTile

__all__ = [
    "LedgerTree",
    "TileCache",
    "TreeEdge",
    "TreeReader",
    "check_size",
    "edge_keys",
    "tiles_for_growth",
]

log = logging.getLogger("nucleus_actors.tree")

_H: Final = 32  # bytes per hash
_TILE_BITS: Final = 8  # log2(TILE_WIDTH)
_new_hash: Final = bytes.__new__

Key = tuple[int, int]
Tiles = Mapping[Key, TreeTile]


def _node(left: bytes, right: bytes) -> bytes:
    return blake3(b"\x01" + left + right).digest()


def _perfect_root(hashes: bytes | bytearray | memoryview, count: int) -> bytes:
    """Root of `count` (a power of two) consecutive 32-byte hashes (a perfect subtree)."""
    data = bytes(hashes[: count * _H])
    # Siblings are adjacent: each NODE hashes 0x01 and 64 consecutive bytes of the level
    # (read through a memoryview: no copy of the pair before the one concatenation).
    while len(data) > _H:
        view = memoryview(data)
        data = b"".join(
            [blake3(b"\x01" + view[i : i + 2 * _H]).digest() for i in range(0, len(data), 2 * _H)]
        )
    return data


def edge_keys(size: int) -> list[Key]:
    """Keys of the partial (right-edge) tiles of a tree of `size` leaves, level 0 first."""
    keys = []
    level = 0
    while size >> (_TILE_BITS * level):
        count = size >> (_TILE_BITS * level)
        if count % TILE_WIDTH:
            keys.append((level, count // TILE_WIDTH))
        level += 1
    return keys


def tiles_for_growth(old_size: int, new_size: int) -> list[Key]:
    """Keys of the tiles that gain hashes when the tree grows from `old_size` to `new_size`."""
    keys: list[Key] = []
    level = 0
    while new_size >> (_TILE_BITS * level):
        before = old_size >> (_TILE_BITS * level)
        after = new_size >> (_TILE_BITS * level)
        if after > before:
            first = before // TILE_WIDTH
            last = (after - 1) // TILE_WIDTH
            keys.extend((level, index) for index in range(first, last + 1))
        level += 1
    return keys


class TreeEdge:
    """The right edge of the tree: the partial tile of each level, and the tree size.

    `extended(leaves)` returns the tiles to store and the edge after them, leaving this one
    untouched, so a batch that fails to commit leaves the edge as it was.
    """

    __slots__ = ("_edges", "size")

    def __init__(self, size: int = 0, edges: Sequence[bytes] = ()) -> None:
        self.size = size
        """Leaves in the tree."""
        self._edges: list[bytes] = list(edges)  # level L: hashes of its partial tile

    @classmethod
    def from_tiles(cls, size: int, tiles: Tiles) -> TreeEdge:
        """The edge of a stored tree of `size` leaves, from its `edge_keys(size)` tiles.

        Raises:
            IntegrityError: a tile is missing or narrower than the tree needs.
        """
        edges: list[bytes] = []
        level = 0
        while size >> (_TILE_BITS * level):
            count = size >> (_TILE_BITS * level)
            width = count % TILE_WIDTH
            if width:
                tile = tiles.get((level, count // TILE_WIDTH))
                if tile is None or tile.width < width:
                    have = "missing" if tile is None else f"{tile.width} wide"
                    raise IntegrityError(
                        f"tree tile ({level}, {count // TILE_WIDTH}) is {have}; a tree of {size} "
                        f"entries needs {width} hashes in it",
                        seq=(count // TILE_WIDTH * TILE_WIDTH) << (_TILE_BITS * level),
                    )
                edges.append(tile.hashes[: width * _H])
            else:
                edges.append(b"")
            level += 1
        return cls(size, edges)

    def extended(self, leaves: Iterable[bytes]) -> tuple[list[TreeTile], TreeEdge]:
        """Append leaf hashes: the tiles that changed (full or partial) and the new edge."""
        edges = list(self._edges)  # immutable bytes: the new edge shares what did not change
        size = self.size
        new = [bytes(leaf) for leaf in leaves]
        new_size = size + len(new)
        tiles: list[TreeTile] = []
        full_bytes = TILE_WIDTH * _H
        level = 0
        while new:
            if level == len(edges):
                edges.append(b"")
            edge = edges[level]
            index = (size >> (_TILE_BITS * level)) // TILE_WIDTH
            parents: list[bytes] = []
            pos = 0
            while pos < len(new):
                room = TILE_WIDTH - len(edge) // _H
                take = new[pos : pos + room]
                pos += len(take)
                edge += b"".join(take)  # one copy per tile per batch
                if len(edge) == full_bytes:
                    tiles.append(TreeTile(level=level, index=index, hashes=edge))
                    parents.append(_perfect_root(edge, TILE_WIDTH))
                    edge = b""
                    index += 1
            if edge:
                tiles.append(TreeTile(level=level, index=index, hashes=edge))
            edges[level] = edge
            new = parents
            level += 1
        return tiles, TreeEdge(new_size, edges)

    def root(self) -> Hash:
        """Root of the tree (`blake3()` of nothing when empty), from the edge alone."""
        if not self.size:
            return BLAKE3.empty()
        # The complete subtrees of the decomposition, right to left: the set bits of size,
        # lowest first; the bits 8L..8L+7 are groups of hashes in level L's partial tile.
        value: bytes | None = None
        for edge in self._edges:
            count = len(edge) // _H
            end = count
            for r in range(_TILE_BITS):
                if count >> r & 1:
                    group = 1 << r
                    start = end - group
                    sub = _perfect_root(edge[start * _H : end * _H], group)
                    value = sub if value is None else _node(sub, value)
                    end = start
        assert value is not None
        return _new_hash(Hash, value)


# --- reading nodes from stored tiles -----------------------------------------------------------


def _range_nodes(start: int, end: int) -> list[tuple[int, int]]:
    """The perfect subtrees `(height, index)` whose right fold is MTH(D[start:end]), left first.

    `start` is a multiple of a power of two >= end - start (true of every range in a proof).
    """
    nodes = []
    while start < end:
        height = (end - start).bit_length() - 1
        nodes.append((height, start >> height))
        start += 1 << height
    return nodes


def _tile_of(height: int, index: int) -> tuple[Key, int, int]:
    """Where node (height, index) lies: its tile key, first slot, and number of slots."""
    level, r = divmod(height, _TILE_BITS)
    first = index << r
    return (level, first // TILE_WIDTH), first % TILE_WIDTH, 1 << r


def _tile_levels(hashes: bytes) -> list[bytes]:
    """The nodes inside a tile: `levels[r]` holds its complete nodes of height `8L + r`
    (`levels[0]` is the tile itself), r = 0..8."""
    levels = [hashes]
    current = hashes
    step = 2 * _H
    for _ in range(_TILE_BITS):
        view = memoryview(current)
        current = b"".join(
            [
                blake3(b"\x01" + view[i : i + step]).digest()
                for i in range(0, len(current) - step + 1, step)
            ]
        )
        levels.append(current)
    return levels


class TileCache:
    """Full tiles (immutable once stored) with their inner nodes, least recently used out."""

    __slots__ = ("_data", "capacity")

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        """Most tiles kept (each about 16 KiB with its inner nodes)."""
        self._data: OrderedDict[Key, list[bytes]] = OrderedDict()

    def get(self, key: Key) -> list[bytes] | None:
        levels = self._data.get(key)
        if levels is not None:
            self._data.move_to_end(key)
        return levels

    def put(self, key: Key, levels: list[bytes]) -> None:
        self._data[key] = levels
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)


class TreeReader:
    """Computes roots and proofs for trees up to `size` leaves from stored tiles.

    Gather what a request needs (`want_*`), read those tiles in one call (`keys`), then
    compute. Tiles may be wider than `size` needs (the ledger grew meanwhile): only the
    prefix that a tree of `size` leaves has is used, and it never changes once stored. Full
    tiles come from (and go to) `cache` when one is given.
    """

    __slots__ = ("_cache", "_levels", "_needed")

    def __init__(self, cache: TileCache | None = None) -> None:
        self._needed: set[Key] = set()
        self._levels: dict[Key, list[bytes]] = {}
        self._cache = cache

    def _want(self, start: int, end: int) -> None:
        for height, index in _range_nodes(start, end):
            self._needed.add(_tile_of(height, index)[0])

    def keys(self) -> list[Key]:
        """The tiles to read, sorted."""
        return sorted(self._needed)

    async def load(
        self, read_tiles: Callable[[Sequence[Key]], Awaitable[dict[Key, TreeTile]]]
    ) -> None:
        """Read every tile wanted so far that the cache lacks (one call)."""
        missing = []
        for key in self.keys():
            cached = None if self._cache is None else self._cache.get(key)
            if cached is None:
                missing.append(key)
            else:
                self._levels[key] = cached
        if not missing:
            return
        for key, tile in (await read_tiles(missing)).items():
            levels = self._levels[key] = _tile_levels(tile.hashes)
            if self._cache is not None and tile.width == TILE_WIDTH:
                self._cache.put(key, levels)

    def _node(self, height: int, index: int) -> bytes:
        key, slot, count = _tile_of(height, index)
        levels = self._levels.get(key)
        r = height % _TILE_BITS
        at = (slot >> r) * _H
        if levels is None or len(levels[r]) < at + _H:
            have = "missing" if levels is None else f"{len(levels[0]) // _H} wide"
            raise IntegrityError(
                f"tree tile {key} is {have}; node (height {height}, index {index}) needs "
                f"{slot + count} hashes in it",
                seq=index << height,
            )
        return levels[r][at : at + _H]

    def _range(self, start: int, end: int) -> Hash:
        nodes = [self._node(h, k) for h, k in _range_nodes(start, end)]
        value = nodes.pop()
        while nodes:
            value = _node(nodes.pop(), value)
        return _new_hash(Hash, value)

    # root
    def want_root(self, size: int) -> None:
        if size:
            self._want(0, size)

    def root(self, size: int) -> Hash:
        return self._range(0, size) if size else BLAKE3.empty()

    # inclusion
    def want_inclusion(self, seq: int, size: int) -> None:
        for a, b in inclusion_ranges(seq, size):
            self._want(a, b)
        self._want(seq, seq + 1)
        self.want_root(size)

    def inclusion(self, seq: int, size: int) -> InclusionProof:
        return InclusionProof(
            seq=seq,
            size=size,
            leaf=self._range(seq, seq + 1),
            path=tuple(self._range(a, b) for a, b in inclusion_ranges(seq, size)),
            root=self.root(size),
        )

    # consistency
    def want_consistency(self, old_size: int, new_size: int) -> None:
        for a, b in consistency_ranges(old_size, new_size):
            self._want(a, b)
        self.want_root(old_size)
        self.want_root(new_size)

    def consistency(self, old_size: int, new_size: int) -> ConsistencyProof:
        return ConsistencyProof(
            old_size=old_size,
            new_size=new_size,
            old_root=self.root(old_size),
            new_root=self.root(new_size),
            path=tuple(self._range(a, b) for a, b in consistency_ranges(old_size, new_size)),
        )


def check_size(name: str, value: object, length: int, minimum: int) -> int:
    """Validate a size/seq argument of a proof request against the ledger `length`.

    Raises:
        ProofError: not an int, below `minimum`, or beyond the ledger.
    """
    if type(value) is not int or value < minimum:
        raise ProofError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > length:
        raise ProofError(f"{name} {value} is beyond the ledger length {length}")
    return value


# --- the engine's tree -------------------------------------------------------------------------

BUILD_CHUNK: Final = 1 << 16
"""Entries per batch of tiles when a tree is built for a ledger stored without one."""


class LedgerTree:
    """A ledger's Merkle tree: the right edge in memory, the tiles in a `TreeStore`.

    The pipeline calls `grow` for each batch (the tiles go into the same `StorageBatch`) and
    `adopt` once it committed; proofs read tiles of any size up to the committed length.
    """

    __slots__ = ("cache", "edge", "ledger_id", "store")

    def __init__(self, store: TreeStore, ledger_id: str) -> None:
        self.store = store
        self.ledger_id = ledger_id
        self.edge = TreeEdge()
        self.cache = TileCache()

    async def open(self, storage: StorageBackend, length: int) -> None:
        """Load the edge of the stored tree of `length` entries; build what is missing.

        A ledger stored without tiles (an older file, or `merkle_tree=False` before) gets them
        built once, from the last point where the stored tiles are complete, in batches of
        `BUILD_CHUNK` entries (logged at INFO with progress). Cancellation: the batches stored
        so far stay; the next open continues from them.

        Raises:
            StorageError: reading entries or storing tiles failed.
        """
        try:
            self.edge = TreeEdge.from_tiles(length, await self.store.read_tiles(edge_keys(length)))
            return
        except IntegrityError:
            pass
        start = (length // BUILD_CHUNK) * BUILD_CHUNK
        while start:
            try:
                stored = await self.store.read_tiles(edge_keys(start))
                self.edge = TreeEdge.from_tiles(start, stored)
                break
            except IntegrityError:
                start -= BUILD_CHUNK
        else:
            self.edge = TreeEdge()
        log.info(
            "ledger %r: building its Merkle tree tiles for entries %d..%d (stored without them)",
            self.ledger_id,
            start,
            length,
        )
        while self.edge.size < length:
            stop = min(length, self.edge.size + BUILD_CHUNK)
            leaves: list[bytes] = []
            entries = storage.read(self.edge.size, stop)
            try:
                async for entry in entries:
                    leaves.append(BLAKE3.leaf(entry.canonical))
            finally:
                aclose = getattr(entries, "aclose", None)
                if aclose is not None:
                    await aclose()
            if len(leaves) != stop - self.edge.size:
                raise IntegrityError(
                    f"storage returned {len(leaves)} entries from {self.edge.size}, expected "
                    f"{stop - self.edge.size}",
                    seq=self.edge.size + len(leaves),
                )
            tiles, grown = self.edge.extended(leaves)
            await storage.append(StorageBatch(entries=(), tree=tiles))
            self.edge = grown
            log.info("ledger %r: Merkle tree built for %d/%d entries", self.ledger_id, stop, length)

    def grow(self, leaves: Sequence[bytes]) -> tuple[list[TreeTile], TreeEdge]:
        """The tiles a batch's leaf hashes change and the edge after it (adopt it once
        committed)."""
        return self.edge.extended(leaves)

    async def reload(self, length: int) -> None:
        """Re-read the edge after a batch of unknown outcome landed (it carried its tiles).

        Raises:
            IntegrityError: the stored tiles do not cover `length` entries.
        """
        self.edge = TreeEdge.from_tiles(length, await self.store.read_tiles(edge_keys(length)))

    async def root(self, size: int | None, length: int) -> Hash:
        if size is None or size == self.edge.size == length:
            return self.edge.root()
        check_size("size", size, length, 0)
        reader = TreeReader(self.cache)
        reader.want_root(size)
        await reader.load(self.store.read_tiles)
        return reader.root(size)

    async def inclusion(self, seq: int, size: int | None, length: int) -> InclusionProof:
        size = length if size is None else check_size("size", size, length, 1)
        if type(seq) is not int or not 0 <= seq < size:
            raise ProofError(f"seq must be an int in [0, {size}) (the tree size), got {seq!r}")
        reader = TreeReader(self.cache)
        reader.want_inclusion(seq, size)
        await reader.load(self.store.read_tiles)
        return reader.inclusion(seq, size)

    async def consistency(
        self, old_size: int, new_size: int | None, length: int
    ) -> ConsistencyProof:
        new_size = length if new_size is None else check_size("new_size", new_size, length, 1)
        check_size("old_size", old_size, new_size, 1)
        reader = TreeReader(self.cache)
        reader.want_consistency(old_size, new_size)
        await reader.load(self.store.read_tiles)
        return reader.consistency(old_size, new_size)
