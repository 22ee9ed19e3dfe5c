"""The engine keeps the Merkle tree in storage: roots and proofs for every size, across
reopening, for files written without tiles, and from a module's read-only view."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from nucleus_actors import (
    ConsistencyProof,
    InclusionProof,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleContext,
    ProofError,
    Record,
    StorageError,
    open_ledger,
)
from nucleus_actors._tree import BUILD_CHUNK
from nucleus_actors.proofs import BLAKE3, consistency_path, inclusion_path, root
from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBackend, TreeTile

CONFIG = LedgerConfig(ledger_id="orders")


async def _leaves(engine: LedgerEngine) -> list[bytes]:
    return [BLAKE3.leaf(entry.canonical) async for entry in engine.read(0)]


async def _append(engine: LedgerEngine, n: int, rng: random.Random) -> None:
    """n records in a mix of single appends, append_many and concurrent appends."""
    done = 0
    while done < n:
        step = min(n - done, rng.choice([1, 1, 3, 17, 256, 300]))
        if step == 1:
            await engine.append(Record("order.created", {"n": done}))
        elif rng.random() < 0.5:
            await engine.append_many([Record("order.bulk", {"n": done + i}) for i in range(step)])
        else:
            async with trio.open_nursery() as nursery:
                for i in range(step):
                    nursery.start_soon(engine.append, Record("order.many", {"n": done + i}))
        done += step


async def _check_everything(engine: LedgerEngine, sizes: Sequence[int]) -> None:
    leaves = await _leaves(engine)
    n = engine.state.length
    assert len(leaves) == n
    assert await engine.root() == root(BLAKE3, leaves)
    for size in sizes:
        expected_root = root(BLAKE3, leaves[:size])
        assert await engine.root(size) == expected_root
        if not size:
            continue
        for seq in {0, size // 2, size - 1}:
            proof = await engine.inclusion_proof(seq, size)
            assert isinstance(proof, InclusionProof)
            assert (proof.seq, proof.size, proof.root) == (seq, size, expected_root)
            assert proof.leaf == leaves[seq]
            assert list(proof.path) == inclusion_path(BLAKE3, leaves, seq, size)
            proof.verify()
        for old in {1, size // 3 or 1, size}:
            consistency = await engine.consistency_proof(old, size)
            assert isinstance(consistency, ConsistencyProof)
            assert consistency.old_root == root(BLAKE3, leaves[:old])
            assert consistency.new_root == expected_root
            assert list(consistency.path) == consistency_path(BLAKE3, leaves, old, size)
            consistency.verify()
    default = await engine.inclusion_proof(0)
    assert default.size == n
    assert (await engine.consistency_proof(1)).new_size == n


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_roots_and_proofs_for_every_size_as_the_ledger_grows(
    kind: str, tmp_path: Path
) -> None:
    storage: StorageBackend = (
        MemoryStorage() if kind == "memory" else SQLiteStorage(tmp_path / "l.db")
    )
    rng = random.Random(18)
    async with open_ledger(CONFIG, storage=storage) as engine:
        assert await engine.root() == BLAKE3.empty()
        await _append(engine, 1, rng)
        await _check_everything(engine, [0, 1])
        await _append(engine, 700, rng)
        await _check_everything(engine, [1, 2, 3, 255, 256, 257, 511, 512, 700, 701])


async def test_the_tree_survives_reopening_and_keeps_growing(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    rng = random.Random(6962)
    async with open_ledger(CONFIG, storage=SQLiteStorage(path)) as engine:
        await _append(engine, 300, rng)
        before = await engine.root()
    async with open_ledger(CONFIG, storage=SQLiteStorage(path)) as engine:
        assert await engine.root() == before
        await _append(engine, 300, rng)
        await _check_everything(engine, [300, 301, 512, 600])


async def test_a_file_without_tiles_gets_them_built_once_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nucleus_actors._tree as tree_module

    monkeypatch.setattr(tree_module, "BUILD_CHUNK", 256)  # several build batches
    path = tmp_path / "l.db"
    without = LedgerConfig(ledger_id="orders", merkle_tree=False)
    async with open_ledger(without, storage=SQLiteStorage(path)) as engine:
        await _append(engine, 1000, random.Random(1))
        with pytest.raises(StorageError, match=r"keeps no Merkle tree \(.*merkle_tree=False"):
            await engine.root()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM tree_tiles").fetchone() == (0,)
    conn.close()
    caplog.set_level("INFO", logger="nucleus_actors.tree")
    async with open_ledger(CONFIG, storage=SQLiteStorage(path)) as engine:
        await _check_everything(engine, [1, 999, 1000])
    built = [r.getMessage() for r in caplog.records if "built for" in r.getMessage()]
    assert built[-1].endswith("built for 1000/1000 entries")
    assert len(built) == 4  # 256, 512, 768, 1000
    caplog.clear()
    async with open_ledger(CONFIG, storage=SQLiteStorage(path)) as engine:
        assert engine.state.length == 1000
    assert not [r for r in caplog.records if "building" in r.getMessage()]
    assert BUILD_CHUNK == 1 << 16  # the default, restored


async def test_an_interrupted_build_continues_from_its_last_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nucleus_actors._tree as tree_module

    monkeypatch.setattr(tree_module, "BUILD_CHUNK", 256)
    path = tmp_path / "l.db"
    without = LedgerConfig(ledger_id="orders", merkle_tree=False)
    async with open_ledger(without, storage=SQLiteStorage(path)) as engine:
        await _append(engine, 900, random.Random(2))
    # Pretend a build stopped after its first two batches: tiles for 512 entries only.
    storage = SQLiteStorage(path)
    await storage.open("orders")
    leaves = [BLAKE3.leaf(e.canonical) async for e in storage.read(0, 512)]
    tiles = [
        TreeTile(level=0, index=i, hashes=b"".join(leaves[256 * i : 256 * (i + 1)]))
        for i in range(2)
    ]
    tiles.append(
        TreeTile(level=1, index=0, hashes=root(BLAKE3, leaves[:256]) + root(BLAKE3, leaves[256:]))
    )
    from nucleus_actors.storage import StorageBatch

    await storage.append(StorageBatch(entries=(), tree=tiles))
    await storage.close()
    async with open_ledger(CONFIG, storage=SQLiteStorage(path)) as engine:
        await _check_everything(engine, [512, 900])


async def test_bad_requests_are_proof_errors() -> None:
    async with open_ledger(CONFIG) as engine:
        await engine.append_many([Record("k", {"n": i}) for i in range(5)])
        with pytest.raises(ProofError, match=r"seq must be an int in \[0, 5\)"):
            await engine.inclusion_proof(5)
        with pytest.raises(ProofError, match="size 6 is beyond the ledger length 5"):
            await engine.inclusion_proof(0, 6)
        with pytest.raises(ProofError, match=r"seq must be an int in \[0, 3\)"):
            await engine.inclusion_proof(3, 3)
        with pytest.raises(ProofError, match="old_size must be an int >= 1"):
            await engine.consistency_proof(0)
        with pytest.raises(ProofError, match="old_size 5 is beyond the ledger length 4"):
            await engine.consistency_proof(5, 4)
        with pytest.raises(ProofError, match="size must be an int >= 0"):
            await engine.root(-1)
        with pytest.raises(ProofError, match="size must be an int >= 1"):
            await engine.inclusion_proof(0, 0)


async def test_proofs_need_an_open_engine_and_a_tree() -> None:
    engine = LedgerEngine(CONFIG)
    with pytest.raises(Exception, match="not open"):
        await engine.root()

    class NoTiles(MemoryStorage):
        read_tiles = None  # type: ignore[assignment]

    async with open_ledger(CONFIG, storage=NoTiles()) as engine:  # type: ignore[arg-type]
        await engine.append(Record("k", {}))
        with pytest.raises(StorageError, match="lacks TreeStore"):
            await engine.inclusion_proof(0)
    required = LedgerConfig(ledger_id="orders", merkle_tree=True)
    with pytest.raises(StorageError, match="lacks the TreeStore capability"):
        async with open_ledger(required, storage=NoTiles()):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="merkle_tree must be None, True or False"):
        LedgerConfig(ledger_id="x", merkle_tree=1)  # type: ignore[arg-type]


class Prover(Module):
    id = "prover"

    def __init__(self) -> None:
        self.proofs: list[Any] = []
        self.ctx: ModuleContext | None = None

    async def start(self, ctx: ModuleContext) -> None:
        self.ctx = ctx

    async def after_append(self, record: Record, hash: Any) -> None:
        assert self.ctx is not None
        assert record.seq is not None
        proof = await self.ctx.ledger.inclusion_proof(record.seq, record.seq + 1)
        proof.verify()
        self.proofs.append(proof)
        if record.seq:
            (await self.ctx.ledger.consistency_proof(record.seq, record.seq + 1)).verify()
        assert await self.ctx.ledger.root(record.seq + 1) == proof.root


async def test_a_module_proves_from_its_read_only_view() -> None:
    prover = Prover()
    async with open_ledger(CONFIG, modules=[prover]) as engine:
        for i in range(20):
            await engine.append(Record("k", {"n": i}))
        # An ask is served after the deliveries queued before it (every append above).
        assert await engine.modules.get(Prover).ask(lambda m: len(m.proofs)) == 20
    assert [p.seq for p in prover.proofs] == list(range(20))


class UnsureStorage(MemoryStorage):
    """Stores the 2nd batch, then raises; right after, its head cannot be read either."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0
        self.head_broken = False

    async def append(self, batch: Any) -> None:
        self.batches += 1
        await super().append(batch)
        if self.batches == 2:
            self.head_broken = True
            raise StorageError("disk said no (after writing)")

    async def head(self) -> Any:
        if self.head_broken:
            self.head_broken = False
            raise StorageError("head unreadable")
        return await super().head()


async def test_a_batch_of_unknown_outcome_that_landed_keeps_the_tree_right() -> None:
    async with open_ledger(CONFIG, storage=UnsureStorage()) as engine:
        await engine.append_many([Record("k", {"n": i}) for i in range(300)])
        with pytest.raises(StorageError, match="could not tell whether it was stored"):
            await engine.append_many([Record("k", {"n": i}) for i in range(300, 520)])
        # The next append re-reads the head, adopts the landed batch and its tiles.
        await engine.append(Record("k", {"n": 520}))
        assert engine.state.length == 521
        await _check_everything(engine, [300, 301, 520, 521])
