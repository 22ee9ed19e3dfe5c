"""The tree kept as tiles: incremental growth, the right edge, proofs from O(log n) tile reads."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from nucleus_actors import IntegrityError, ProofError
from nucleus_actors._tree import (
    TileCache,
    TreeEdge,
    TreeReader,
    check_size,
    edge_keys,
    tiles_for_growth,
)
from nucleus_actors.hashing import leaf_hash
from nucleus_actors.proofs import BLAKE3, consistency_path, inclusion_path, root
from nucleus_actors.storage._base import TreeTile

Key = tuple[int, int]


class FakeTiles:
    """A TreeStore's tiles in a dict: a wider tile replaces a narrower one, never the reverse."""

    def __init__(self) -> None:
        self.tiles: dict[Key, TreeTile] = {}
        self.reads: list[list[Key]] = []

    def store(self, tiles: Sequence[TreeTile], length: int) -> None:
        for tile in tiles:
            # The storage contract's rule: only complete nodes of the tree after the batch.
            assert 256 * tile.index + tile.width <= length >> (8 * tile.level)
            key = (tile.level, tile.index)
            old = self.tiles.get(key)
            if old is not None:
                assert tile.hashes[: len(old.hashes)] == old.hashes, "a stored hash changed"
            if old is None or tile.width >= old.width:
                self.tiles[key] = tile

    async def read_tiles(self, keys: Sequence[Key]) -> dict[Key, TreeTile]:
        self.reads.append(list(keys))
        return {k: self.tiles[k] for k in keys if k in self.tiles}


LEAVES = [leaf_hash(b"leaf %d" % i) for i in range(70_000)]


def _grow(sizes: list[int]) -> tuple[FakeTiles, TreeEdge]:
    store = FakeTiles()
    edge = TreeEdge()
    for size in sizes:
        tiles, new = edge.extended(LEAVES[edge.size : size])
        assert sorted((t.level, t.index) for t in tiles) == tiles_for_growth(edge.size, size)
        store.store(tiles, size)
        assert new.size == size
        edge = new
    return store, edge


def test_edge_root_matches_the_tree_as_it_grows() -> None:
    rng = random.Random(6962)
    sizes, size = [], 0
    while size < 1500:
        size += rng.choice([1, 1, 2, 3, 7, 64, 255, 256, 257])
        sizes.append(size)
    store = FakeTiles()
    edge = TreeEdge()
    assert edge.root() == BLAKE3.empty()
    for size in sizes:
        tiles, edge = edge.extended(LEAVES[edge.size : size])
        store.store(tiles, size)
        assert edge.root() == root(BLAKE3, LEAVES[:size])


def test_a_failed_batch_leaves_the_edge_untouched() -> None:
    _, edge = _grow([300])
    before = edge.root()
    edge.extended(LEAVES[300:900])  # computed, never adopted
    assert edge.size == 300
    assert edge.root() == before


@pytest.mark.parametrize("size", [1, 255, 256, 257, 65535, 65536, 65537, 69_999])
async def test_edge_reloads_from_stored_tiles(size: int) -> None:
    store, edge = _grow([size // 3, size])
    loaded = TreeEdge.from_tiles(size, await store.read_tiles(edge_keys(size)))
    assert loaded.root() == edge.root() == root(BLAKE3, LEAVES[:size])
    if size < len(LEAVES):
        _, a = edge.extended(LEAVES[size : size + 1])
        _, b = loaded.extended(LEAVES[size : size + 1])
        assert a.root() == b.root()


async def test_missing_edge_tile_is_an_integrity_error() -> None:
    store, _ = _grow([600])
    del store.tiles[(0, 2)]
    with pytest.raises(IntegrityError, match=r"tree tile \(0, 2\) is missing") as info:
        TreeEdge.from_tiles(600, await store.read_tiles(edge_keys(600)))
    assert info.value.seq == 512
    store, _ = _grow([600])
    with pytest.raises(IntegrityError, match=r"tree tile \(0, 2\) is 88 wide"):
        TreeEdge.from_tiles(601, await store.read_tiles(edge_keys(601)))


def test_tiles_for_growth() -> None:
    assert tiles_for_growth(0, 1) == [(0, 0)]
    assert tiles_for_growth(255, 256) == [(0, 0), (1, 0)]
    assert tiles_for_growth(256, 257) == [(0, 1)]
    assert tiles_for_growth(100, 700) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert tiles_for_growth(65535, 65536) == [(0, 255), (1, 0), (2, 0)]
    assert tiles_for_growth(5, 5) == []
    assert edge_keys(0) == []
    assert edge_keys(256) == [(1, 0)]
    assert edge_keys(65536 + 300) == [(0, 257), (1, 1), (2, 0)]


async def _proofs(store: FakeTiles, requests: list[tuple[str, int, int]], length: int) -> None:
    for kind, a, b in requests:
        reader = TreeReader()
        store.reads.clear()
        if kind == "inclusion":
            reader.want_inclusion(a, b)
            await reader.load(store.read_tiles)
            proof = reader.inclusion(a, b)
            assert list(proof.path) == inclusion_path(BLAKE3, LEAVES, a, b)
            assert proof.leaf == LEAVES[a]
        else:
            reader.want_consistency(a, b)
            await reader.load(store.read_tiles)
            proof = reader.consistency(a, b)  # type: ignore[assignment]
            assert list(proof.path) == consistency_path(BLAKE3, LEAVES, a, b)
        proof.verify()
        assert len(store.reads) == 1, "one storage call per proof"
        levels = max(1, (length.bit_length() + 7) // 8)
        assert len(store.reads[0]) <= 4 * levels + 2, store.reads[0]


async def test_proofs_from_tiles_equal_proofs_from_leaves() -> None:
    rng = random.Random(9162)
    store, edge = _grow([1000, 4097, 65536, 70_000])
    requests: list[tuple[str, int, int]] = []
    for size in [1, 2, 7, 256, 257, 1000, 4097]:
        for seq in {0, size - 1, rng.randrange(size)}:
            requests.append(("inclusion", seq, size))
        for old in {1, size, rng.randrange(1, size + 1)}:
            requests.append(("consistency", old, size))
    # Across the level-2 boundary (each reference proof hashes the whole prefix: keep it short).
    for size in [65535, 65537, 70_000]:
        requests.append(("inclusion", rng.randrange(size), size))
        requests.append(("consistency", rng.randrange(1, size), size))
    await _proofs(store, requests, edge.size)
    reader = TreeReader()
    for size in [0, 1, 300, 70_000]:
        reader.want_root(size)
    await reader.load(store.read_tiles)
    for size in [0, 1, 300, 70_000]:
        assert reader.root(size) == root(BLAKE3, LEAVES[:size])


async def test_every_small_proof_from_tiles() -> None:
    store, edge = _grow([1, 3, 40, 300, 520])
    for size in [*range(1, 40), 255, 256, 257, 300, 511, 512, 513, 520]:
        await _proofs(
            store,
            [("inclusion", s, size) for s in range(0, size, max(1, size // 20))]
            + [("consistency", m, size) for m in range(1, size + 1, max(1, size // 20))],
            edge.size,
        )


async def test_a_missing_tile_is_named() -> None:
    store, _ = _grow([1000])
    del store.tiles[(0, 1)]
    reader = TreeReader()
    reader.want_inclusion(300, 1000)
    await reader.load(store.read_tiles)
    with pytest.raises(IntegrityError, match=r"tree tile \(0, 1\) is missing"):
        reader.inclusion(300, 1000)


def test_check_size() -> None:
    assert check_size("seq", 3, 10, 0) == 3
    with pytest.raises(ProofError, match="seq must be an int >= 0, got -1"):
        check_size("seq", -1, 10, 0)
    with pytest.raises(ProofError, match="size 11 is beyond the ledger length 10"):
        check_size("size", 11, 10, 0)
    with pytest.raises(ProofError, match="got True"):
        check_size("size", True, 10, 0)


async def test_full_tiles_come_from_the_cache() -> None:
    store, _ = _grow([1000])
    cache = TileCache(capacity=2)
    first = TreeReader(cache)
    first.want_inclusion(10, 1000)
    await first.load(store.read_tiles)
    assert store.reads[-1] == [(0, 0), (0, 3), (1, 0)]
    proof = first.inclusion(10, 1000)
    second = TreeReader(cache)
    second.want_inclusion(10, 1000)
    await second.load(store.read_tiles)
    # (0, 0) is full and cached; the partial tiles (0, 3) and (1, 0) are read again.
    assert store.reads[-1] == [(0, 3), (1, 0)]
    assert second.inclusion(10, 1000) == proof
    third = TreeReader(cache)
    third.want_inclusion(300, 1000)  # tiles (0, 1) and (0, 2) are full: (0, 0) is evicted
    third.want_inclusion(600, 1000)
    await third.load(store.read_tiles)
    fourth = TreeReader(cache)
    fourth.want_inclusion(10, 1000)
    await fourth.load(store.read_tiles)
    assert (0, 0) in store.reads[-1]
    assert fourth.inclusion(10, 1000) == proof
