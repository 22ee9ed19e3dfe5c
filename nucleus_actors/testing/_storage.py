"""`StorageConformance`: the storage contract (v2) as a reusable pytest suite for any backend.

```python
import pytest
from nucleus_actors.testing import StorageConformance


class TestMyBackend(StorageConformance):
    @pytest.fixture
    def storage_factory(self, tmp_path):
        return lambda: MyBackend(tmp_path / "ledger")  # a new, empty store per call
```

Every test is a plain (synchronous) pytest test that runs its body with `trio.run`, so the
suite needs neither pytest-trio nor any particular event-loop configuration. Tests of a
capability the backend does not implement are skipped; a backend without a capability must
refuse a batch that carries that part (nothing stored).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import trio
import trio.lowlevel

from nucleus_actors import Entry, Hash, Record, StorageError
from nucleus_actors.hashing import canonical_bytes, chain_step, genesis
from nucleus_actors.storage import (
    CursorStore,
    IdempotencyRecord,
    IdempotencyStore,
    StorageBackend,
    StorageBatch,
    TreeStore,
    TreeTile,
    check_contract,
)

__all__ = ["StorageConformance", "make_entries"]

LEDGER = "conformance"

Factory = Callable[[], StorageBackend]
_Body = Callable[[Any, Factory], Awaitable[None]]
_S = TypeVar("_S")


def make_entries(
    ledger_id: str, start: int, count: int, prev: Hash | None = None, *, kind: str = "k"
) -> list[Entry]:
    """`count` chained entries from seq `start`, as the engine would commit them.

    Args:
        ledger_id: chains from its genesis hash when `prev` is None (then `start` must be 0).
        start: the first seq.
        count: how many.
        prev: the chain hash before `start` (the stored head).
        kind: the records' kind.
    """
    head = genesis(ledger_id) if prev is None else prev
    entries = []
    for seq in range(start, start + count):
        record = Record(kind, {"n": seq, "text": "é" * (seq % 5)}, seq=seq, timestamp=1_000 + seq)
        data = canonical_bytes(record)
        head = chain_step(head, seq, data)
        entries.append(Entry(seq, record, head, data))
    return entries


def _test(body: _Body) -> Callable[[Any, Factory], None]:
    """A synchronous pytest test that runs the async `body` with `trio.run`."""

    def test(self: Any, storage_factory: Factory) -> None:
        trio.run(body, self, storage_factory)

    test.__name__ = body.__name__.lstrip("_")
    test.__qualname__ = f"StorageConformance.{test.__name__}"
    test.__doc__ = body.__doc__
    return test


def _skip(reason: str) -> None:
    import pytest  # the suite runs under pytest; importing the toolkit does not need it

    pytest.skip(reason)


def _needs(storage: StorageBackend, capability: Callable[..., _S]) -> _S:
    protocol: Any = capability
    if not isinstance(storage, protocol):
        _skip(f"{type(storage).__name__} does not implement {protocol.__name__}")
    return cast("_S", storage)


async def _opened(factory: Factory) -> StorageBackend:
    storage = factory()
    await storage.open(LEDGER)
    return storage


async def _all(storage: StorageBackend, start: int = 0, stop: int | None = None) -> list[Entry]:
    return [entry async for entry in storage.read(start, stop)]


async def _refused(storage: StorageBackend, batch: StorageBatch, match: str) -> None:
    """`append(batch)` raises StorageError whose message contains `match`; nothing stored."""
    before = await storage.head()
    try:
        await storage.append(batch)
    except StorageError as exc:
        if match not in str(exc):
            raise AssertionError(f"expected {match!r} in the StorageError, got {exc}") from exc
    else:
        raise AssertionError(f"append({batch!r}) was accepted; it must raise StorageError")
    assert await storage.head() == before, "a refused batch changed the head"


class StorageConformance:
    """The storage contract (v2) as pytest tests: subclass it as `Test...` in a test module
    and provide a `storage_factory` fixture returning a zero-argument callable that makes a
    backend on a new, empty store on each call (see docs/storage.md, "Writing a backend")."""

    # -- the contract ------------------------------------------------------------------------
    async def _test_declares_storage_contract_v2(self, factory: Factory) -> None:
        """The backend says `storage_contract = 2` and has every protocol method."""
        storage = factory()
        check_contract(storage)
        assert isinstance(storage, StorageBackend)
        await trio.lowlevel.checkpoint()

    async def _test_a_new_store_is_empty(self, factory: Factory) -> None:
        """A new store's head is `(0, genesis(ledger_id))` and it reads nothing."""
        storage = await _opened(factory)
        assert await storage.head() == (0, genesis(LEDGER))
        assert await _all(storage) == []
        await storage.close()

    async def _test_appended_entries_read_back_exactly(self, factory: Factory) -> None:
        """Entries read back equal what was appended (seq, record, hash, canonical bytes),
        and the head follows each batch."""
        storage = await _opened(factory)
        first = make_entries(LEDGER, 0, 3)
        await storage.append(StorageBatch(entries=first))
        assert await storage.head() == (3, first[-1].hash)
        second = make_entries(LEDGER, 3, 600, first[-1].hash)
        await storage.append(StorageBatch(entries=second))
        assert await storage.head() == (603, second[-1].hash)
        stored = await _all(storage)
        assert stored == first + second
        assert [e.canonical for e in stored] == [e.canonical for e in first + second]
        await storage.close()

    async def _test_read_ranges(self, factory: Factory) -> None:
        """`read(start, stop)` is half-open, clipped to the head; `stop=None` reads to the head
        at the call; bad ranges raise ValueError."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 10)
        await storage.append(StorageBatch(entries=entries))
        assert await _all(storage, 2, 5) == entries[2:5]
        assert await _all(storage, 7) == entries[7:]
        assert await _all(storage, 8, 100) == entries[8:]
        assert await _all(storage, 4, 4) == []
        assert await _all(storage, 10) == []
        reader = storage.read(0)
        await storage.append(StorageBatch(entries=make_entries(LEDGER, 10, 2, entries[-1].hash)))
        assert [e.seq async for e in reader] == list(range(10))  # the head at the call
        for start, stop in ((-1, None), (3, 2), (1.0, None), (0, "5")):
            try:
                storage.read(start, stop)  # type: ignore[arg-type]
            except ValueError:
                pass
            else:
                raise AssertionError(f"read({start!r}, {stop!r}) must raise ValueError")
        await storage.close()

    async def _test_an_abandoned_reader_holds_nothing(self, factory: Factory) -> None:
        """A reader dropped half-way does not block appends or close."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 1200)
        await storage.append(StorageBatch(entries=entries))
        async for entry in storage.read(0):
            if entry.seq == 600:
                break
        await storage.append(StorageBatch(entries=make_entries(LEDGER, 1200, 1, entries[-1].hash)))
        assert (await storage.head())[0] == 1201
        await storage.close()

    async def _test_reads_run_beside_appends(self, factory: Factory) -> None:
        """Reads while batches commit see a prefix of the ledger, in order."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 400)
        await storage.append(StorageBatch(entries=entries[:50]))
        seen: list[list[int]] = []

        async def reader() -> None:
            for _ in range(20):
                seen.append([e.seq async for e in storage.read(0)])
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for start in range(50, 400, 50):
                await storage.append(StorageBatch(entries=entries[start : start + 50]))
        assert await _all(storage) == entries
        for seqs in seen:
            assert seqs == list(range(len(seqs)))
        await storage.close()

    async def _test_out_of_order_batches_are_refused(self, factory: Factory) -> None:
        """A batch whose seqs do not run on from the head (gap, overlap, disorder) is refused
        with StorageError, nothing stored."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 5)
        await storage.append(StorageBatch(entries=entries[:2]))
        await _refused(storage, StorageBatch(entries=entries[3:]), "out of order")
        await _refused(storage, StorageBatch(entries=entries[1:3]), "out of order")
        await _refused(storage, StorageBatch(entries=[entries[2], entries[4]]), "out of order")
        await storage.append(StorageBatch(entries=entries[2:]))
        assert await _all(storage) == entries
        await storage.close()

    async def _test_a_batch_chained_to_another_head_is_refused(self, factory: Factory) -> None:
        """A batch built on another head than the stored one (`prev`: another writer's view)
        is refused, nothing stored; one built on the stored head is accepted."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 2)
        await storage.append(StorageBatch(entries=entries[:1], prev=genesis(LEDGER)))
        other = make_entries(LEDGER, 0, 2, kind="other")
        await _refused(storage, StorageBatch(entries=other[1:], prev=other[0].hash), "chain")
        await _refused(storage, StorageBatch(entries=[], prev=other[0].hash), "chain")
        await storage.append(StorageBatch(entries=entries[1:], prev=entries[0].hash))
        assert await _all(storage) == entries
        await storage.close()

    async def _test_an_empty_batch_stores_nothing(self, factory: Factory) -> None:
        """`append(StorageBatch(entries=[]))` is accepted and changes nothing."""
        storage = await _opened(factory)
        await storage.append(StorageBatch(entries=[]))
        assert await storage.head() == (0, genesis(LEDGER))
        await storage.close()

    async def _test_a_non_batch_is_refused(self, factory: Factory) -> None:
        """A v1-style list of entries is refused with StorageError naming StorageBatch."""
        storage = await _opened(factory)
        entries: Any = make_entries(LEDGER, 0, 1)
        await _refused(storage, entries, "StorageBatch")
        await storage.close()

    async def _test_reopen_continues_the_chain(self, factory: Factory) -> None:
        """Closing and opening the same backend object keeps every entry and the head;
        close is idempotent; another ledger id is refused."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 4)
        await storage.append(StorageBatch(entries=entries[:2]))
        await storage.close()
        await storage.close()
        await storage.open(LEDGER)
        assert await storage.head() == (2, entries[1].hash)
        await storage.append(StorageBatch(entries=entries[2:]))
        assert await _all(storage) == entries
        await storage.close()
        try:
            await storage.open("another-ledger")
        except StorageError:
            pass
        else:
            await storage.close()
            raise AssertionError("a store of one ledger was opened as another ledger")

    async def _test_a_second_open_is_refused(self, factory: Factory) -> None:
        """Opening a backend object that is already open raises StorageError."""
        storage = await _opened(factory)
        try:
            await storage.open(LEDGER)
        except StorageError:
            pass
        else:
            raise AssertionError("open() of an open backend must raise StorageError")
        finally:
            await storage.close()

    async def _test_closed_storage_refuses_use(self, factory: Factory) -> None:
        """After close, head/append/read raise StorageError (read at the call)."""
        storage = await _opened(factory)
        await storage.close()
        for attempt in (
            lambda: storage.head(),
            lambda: storage.append(StorageBatch(entries=make_entries(LEDGER, 0, 1))),
        ):
            try:
                await attempt()
            except StorageError:
                pass
            else:
                raise AssertionError("a closed backend must refuse head() and append()")
        try:
            storage.read(0)
        except StorageError:
            pass
        else:
            raise AssertionError("read() on a closed backend must raise StorageError at once")

    async def _test_a_cancelled_append_is_all_or_nothing(self, factory: Factory) -> None:
        """An append cancelled at any point leaves the batch stored entirely or not at all,
        and the head says which."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 60)
        done = 0
        for attempt in range(6):
            batch = entries[done : done + 10]
            with trio.move_on_after(0 if attempt % 2 else 1e-4):
                await storage.append(StorageBatch(entries=batch))
            length, head = await storage.head()
            assert length in (done, done + 10), length
            if length == done + 10:
                assert head == batch[-1].hash
                done = length
            else:
                await storage.append(StorageBatch(entries=batch))
                done += 10
        assert await _all(storage) == entries
        await storage.close()

    # -- capabilities ----------------------------------------------------------------------
    async def _test_cursors_upsert_and_survive_reopen(self, factory: Factory) -> None:
        """CursorStore: cursors commit with their batch (a cursors-only batch too), the last
        value wins, and they survive close/open."""
        storage = await _opened(factory)
        store = _needs(storage, CursorStore)
        entries = make_entries(LEDGER, 0, 4)
        assert await store.load_cursors() == {}
        await storage.append(StorageBatch(entries=entries[:2], cursors={"a": 1, "b": -1}))
        await storage.append(StorageBatch(entries=[], cursors={"b": 0}))
        await storage.append(StorageBatch(entries=entries[2:], cursors={"a": 3}))
        assert await store.load_cursors() == {"a": 3, "b": 0}
        await storage.close()
        await storage.open(LEDGER)
        assert await store.load_cursors() == {"a": 3, "b": 0}
        await _refused(storage, StorageBatch(entries=[], cursors={"a": 4}), "cursor")
        assert await store.load_cursors() == {"a": 3, "b": 0}
        await storage.close()

    async def _test_tree_tiles_upsert_wider_over_narrower(self, factory: Factory) -> None:
        """TreeStore: tiles upsert by (level, index); a wider tile replaces a partial one, a
        narrower one never replaces a wider one; missing keys are absent; survive reopen."""
        storage = await _opened(factory)
        store = _needs(storage, TreeStore)
        entries = make_entries(LEDGER, 0, 600)

        def tile(level: int, index: int, width: int, fill: int) -> TreeTile:
            return TreeTile(level=level, index=index, hashes=bytes([fill]) * (32 * width))

        await storage.append(StorageBatch(entries=entries[:100], tree=[tile(0, 0, 100, 1)]))
        assert await store.read_tiles([(0, 0), (0, 1), (1, 0)]) == {(0, 0): tile(0, 0, 100, 1)}
        await storage.append(
            StorageBatch(entries=entries[100:600], tree=[tile(0, 0, 256, 2), tile(0, 1, 88, 3)])
        )
        await storage.append(StorageBatch(entries=[], tree=[tile(0, 0, 50, 9)]))  # ignored
        expected = {(0, 0): tile(0, 0, 256, 2), (0, 1): tile(0, 1, 88, 3)}
        assert await store.read_tiles([(0, 0), (0, 1), (0, 2)]) == expected
        await storage.close()
        await storage.open(LEDGER)
        assert await store.read_tiles([(0, 1), (0, 0)]) == expected
        # a tile beyond the complete nodes of the tree is refused, with the batch
        more = make_entries(LEDGER, 600, 1, entries[-1].hash)
        await _refused(storage, StorageBatch(entries=more, tree=[tile(1, 0, 3, 4)]), "tile")
        await storage.close()

    async def _test_idempotency_keys_get_replace_prune(self, factory: Factory) -> None:
        """IdempotencyStore: keys commit with their entries, a key stored again replaces the
        record, prune deletes those created before a time and counts them; survive reopen."""
        storage = await _opened(factory)
        store = _needs(storage, IdempotencyStore)
        entries = make_entries(LEDGER, 0, 5)

        def key(name: str, first: int, count: int, created: int) -> IdempotencyRecord:
            return IdempotencyRecord(
                key=name, fingerprint=f"fp-{name}", first_seq=first, count=count, created=created
            )

        assert await store.get_idempotency("a") is None
        await storage.append(
            StorageBatch(entries=entries[:3], idempotency=[key("a", 0, 1, 10), key("b", 1, 2, 20)])
        )
        await storage.append(StorageBatch(entries=entries[3:], idempotency=[key("a", 3, 2, 30)]))
        assert await store.get_idempotency("a") == key("a", 3, 2, 30)
        assert await store.get_idempotency("b") == key("b", 1, 2, 20)
        await storage.close()
        await storage.open(LEDGER)
        assert await store.prune_idempotency(25) == 1
        assert await store.get_idempotency("b") is None
        assert await store.get_idempotency("a") == key("a", 3, 2, 30)
        assert await store.prune_idempotency(25) == 0
        await _refused(storage, StorageBatch(entries=[], idempotency=[key("c", 4, 2, 1)]), "key")
        await storage.close()

    async def _test_every_part_of_a_batch_commits_together(self, factory: Factory) -> None:
        """A batch whose last part is invalid stores none of its parts (entries included)."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 3)
        cursors = {"m": 0} if isinstance(storage, CursorStore) else {}
        bad = StorageBatch(entries=entries, cursors={**cursors, "late": 7})
        if not cursors:
            bad = StorageBatch(entries=entries, tree=[TreeTile(level=2, index=0, hashes=b"x" * 32)])
        await _refused(storage, bad, "")
        assert await _all(storage) == []
        if isinstance(storage, CursorStore):
            assert await storage.load_cursors() == {}
        await storage.close()

    async def _test_a_part_without_its_capability_is_refused(self, factory: Factory) -> None:
        """A backend without a capability refuses a batch carrying that part (never drops it
        silently)."""
        storage = await _opened(factory)
        entries = make_entries(LEDGER, 0, 300)
        parts: list[tuple[Any, StorageBatch]] = [
            (CursorStore, StorageBatch(entries=entries[:1], cursors={"m": 0})),
            (
                TreeStore,
                StorageBatch(
                    entries=entries, tree=[TreeTile(level=0, index=0, hashes=bytes(32 * 256))]
                ),
            ),
            (
                IdempotencyStore,
                StorageBatch(
                    entries=entries[:1],
                    idempotency=[
                        IdempotencyRecord(key="k", fingerprint="f", first_seq=0, count=1, created=1)
                    ],
                ),
            ),
        ]
        lacking = [(cap, batch) for cap, batch in parts if not isinstance(storage, cap)]
        if not lacking:
            await storage.close()
            _skip(f"{type(storage).__name__} implements every capability")
        for capability, batch in lacking:
            await _refused(storage, batch, capability.__name__)
        await storage.close()


# Turn every `_test_*` body into a collected, synchronous `test_*` method.
for _name, _body in list(vars(StorageConformance).items()):
    if _name.startswith("_test_"):
        setattr(StorageConformance, _name[1:], _test(_body))
del _name, _body
