"""Durable delivery: positions, catch-up then live, CATCH_UP overflow, cursors, misuse."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import (
    Hash,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleContext,
    ModuleError,
    ModuleSpec,
    ModuleState,
    Overflow,
    Record,
    RegistryError,
    StorageError,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBatch
from tests.conftest import settle


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="durable", **kw)


class Seen(Module):
    """Records every delivered seq; can be held (stalled) on a trio.Event."""

    def __init__(self, module_id: str = "seen", *, hold: trio.Event | None = None) -> None:
        self.id = module_id
        self.seqs: list[int] = []
        self.hold = hold
        self.fail_at: int | None = None

    async def after_append(self, record: Record, hash: Hash) -> None:
        if self.hold is not None:
            await self.hold.wait()
        assert record.seq is not None
        if record.seq == self.fail_at:
            self.fail_at = None
            raise RuntimeError(f"boom at {record.seq}")
        self.seqs.append(record.seq)


def rec(n: int) -> Record:
    return Record("t", {"n": n})


async def fill(engine: LedgerEngine, count: int) -> None:
    for n in range(count):
        await engine.append(rec(n))


class NoCursors(MemoryStorage):
    """A backend without the CursorStore capability."""

    load_cursors = None  # type: ignore[assignment]


# -- spec and register rules ---------------------------------------------------------------
def test_spec_defaults_and_validation() -> None:
    spec = ModuleSpec(Seen())
    assert (spec.durable, spec.start_at, spec.overflow) == (False, "start", None)
    with pytest.raises(ValueError, match="CATCH_UP needs durable=True"):
        ModuleSpec(Seen(), overflow=Overflow.CATCH_UP)
    with pytest.raises(ValueError, match="BLOCK or CATCH_UP"):
        ModuleSpec(Seen(), durable=True, overflow=Overflow.DROP_NEWEST)
    with pytest.raises(ValueError, match="start_at"):
        ModuleSpec(Seen(), durable=True, start_at="middle")
    with pytest.raises(ValueError, match="cursor_interval"):
        config(cursor_interval=0)
    assert config().cursor_interval == 1.0


async def test_overflow_resolves_at_register() -> None:
    async with LedgerEngine(config()) as engine:
        plain = engine.register(Seen("plain"))
        durable = engine.register(Seen("durable"), durable=True)
        blocking = engine.register(Seen("blocking"), durable=True, overflow="block")
        assert plain._child.spec.overflow is Overflow.BLOCK
        assert durable._child.spec.overflow is Overflow.CATCH_UP
        assert blocking._child.spec.overflow is Overflow.BLOCK
        # A spec with overflow=None stays valid when register turns durability off.
        again = engine.register(ModuleSpec(Seen("again"), durable=True), durable=False)
        assert again._child.spec.overflow is Overflow.BLOCK


async def test_resume_after_on_a_non_durable_module_is_refused() -> None:
    class Owner(Seen):
        async def resume_after(self, ctx: ModuleContext) -> int | None:
            return None

    async with LedgerEngine(config()) as engine:
        with pytest.raises(RegistryError, match=r"resume_after.*not durable"):
            engine.register(Owner())


async def test_durable_needs_the_cursor_store_capability() -> None:
    async with LedgerEngine(config(), storage=NoCursors()) as engine:
        with pytest.raises(StorageError, match=r"register durable module 'seen'.*CursorStore"):
            engine.register(Seen(), durable=True)
        engine.register(Seen())  # a non-durable module does not need it


# -- catch-up then live --------------------------------------------------------------------
async def test_a_new_durable_module_on_an_old_ledger_starts_at_0_or_at_the_end(
    tmp_path: Path,
) -> None:
    storage = SQLiteStorage(tmp_path / "l.db")
    async with open_ledger(config(), storage=storage) as engine:
        await fill(engine, 10)
    first, last = Seen("first"), Seen("last")
    async with open_ledger(
        config(),
        storage=SQLiteStorage(tmp_path / "l.db"),
        modules=[
            ModuleSpec(first, durable=True),
            ModuleSpec(last, durable=True, start_at="end"),
        ],
    ) as engine:
        await engine.append(rec(10))
        await first_caught_up(engine, "first")
        await first_caught_up(engine, "last")
        assert first.seqs == list(range(11))
        assert last.seqs == [10]
        assert engine.modules.get("first").status.lag == 0
        assert engine.modules.get("first").status.cursor == 10


async def first_caught_up(engine: LedgerEngine, module_id: str) -> None:
    """Wait (by an ask, served once caught up to the length at the time) for lag 0."""
    await engine.modules.get(module_id).ask(lambda m: None)
    assert engine.modules.get(module_id).status.lag == 0


async def test_reopen_of_a_sqlite_ledger_continues_from_the_cursor(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    one = Seen()
    async with open_ledger(
        config(), storage=SQLiteStorage(path), modules=[ModuleSpec(one, durable=True)]
    ) as engine:
        await fill(engine, 5)
        await first_caught_up(engine, "seen")
    assert one.seqs == [0, 1, 2, 3, 4]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT seq FROM cursors WHERE module='seen'").fetchone() == (4,)
    # Appended while the module is not there: the next open catches up exactly those.
    async with open_ledger(config(), storage=SQLiteStorage(path)) as engine:
        await fill(engine, 3)
    two = Seen()
    async with open_ledger(
        config(), storage=SQLiteStorage(path), modules=[ModuleSpec(two, durable=True)]
    ) as engine:
        await engine.append(rec(99))
        await first_caught_up(engine, "seen")
    assert two.seqs == [5, 6, 7, 8]


async def test_catch_up_live_switch_under_concurrent_appends(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Deliveries arrive while the module catches up from storage: no gap, dup, reorder."""
    storage = MemoryStorage()
    async with open_ledger(config(), storage=storage) as engine:
        await fill(engine, 300)
    rng = random.Random(7)
    module = Seen()

    class Slow(Seen):
        async def after_append(self, record: Record, hash: Hash) -> None:
            if rng.random() < 0.3:
                await trio.sleep(0.001)
            await super().after_append(record, hash)

    module = Slow()
    async with open_ledger(
        config(), storage=storage, modules=[ModuleSpec(module, durable=True, inbox=4)]
    ) as engine:

        async def writer(k: int) -> None:
            for n in range(100):
                await engine.append(rec(k * 1000 + n))
                if rng.random() < 0.5:
                    await trio.sleep(0.0005)

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(writer, k)
        await first_caught_up(engine, "seen")
        assert module.seqs == list(range(700))


async def test_a_stalled_durable_module_does_not_block_appends_and_catches_up(
    mock_clock: trio.testing.MockClock,
) -> None:
    hold = trio.Event()
    module = Seen(hold=hold)
    async with open_ledger(config(), modules=[ModuleSpec(module, durable=True, inbox=8)]) as engine:
        with trio.fail_after(5):  # virtual time: appends never wait for the module
            await fill(engine, 1000)
        status = engine.modules.get("seen").status
        assert status.inbox_depth <= 8  # memory bounded: the rest stays in storage
        assert status.lag >= 1000 - 8
        assert status.dropped == 0
        hold.set()
        await trio.sleep(1)  # no ask: it catches up by itself, from storage
        assert module.seqs == list(range(1000))
        assert engine.modules.get("seen").status.lag == 0


async def test_a_blocking_durable_module_still_blocks(mock_clock: trio.testing.MockClock) -> None:
    hold = trio.Event()
    module = Seen(hold=hold)
    async with open_ledger(
        config(), modules=[ModuleSpec(module, durable=True, inbox=2, overflow="block")]
    ) as engine:
        with trio.move_on_after(10) as scope:
            await fill(engine, 10)
        assert scope.cancelled_caught
        hold.set()


async def test_restart_discards_the_inbox_and_redelivers_from_the_position(
    mock_clock: trio.testing.MockClock,
) -> None:
    module = Seen()
    module.fail_at = 6
    async with open_ledger(
        config(), modules=[ModuleSpec(lambda: module, durable=True, inbox=4)]
    ) as engine:
        await fill(engine, 12)
        handle = engine.modules.get("seen")
        await handle.wait_state(ModuleState.RUNNING)
        await first_caught_up(engine, "seen")
        assert handle.status.restarts == 1
        assert module.seqs == list(range(12))  # seq 6 failed once, redelivered once


async def test_runtime_cursor_is_stored_with_batches_and_every_interval(
    mock_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    stored: list[dict[str, int]] = []
    original = storage.append

    async def spy(batch: StorageBatch) -> None:
        stored.append(dict(batch.cursors))
        await original(batch)

    storage.append = spy  # type: ignore[method-assign]
    async with open_ledger(
        config(cursor_interval=2.0),
        storage=storage,
        modules=[ModuleSpec(Seen(), durable=True)],
    ) as engine:
        await engine.append(rec(0))
        await first_caught_up(engine, "seen")
        # Its start position (-1: nothing yet) rode with that append's batch; the move to 0
        # waits for the next batch or for cursor_interval.
        assert await storage.load_cursors() == {"seen": -1}
        await engine.append(rec(1))  # rides with this batch
        assert await storage.load_cursors() == {"seen": 0}
        await first_caught_up(engine, "seen")
        start = trio.current_time()
        while (await storage.load_cursors()) != {"seen": 1}:
            await trio.sleep(0.1)
        assert trio.current_time() - start >= 1.9  # on its own, after cursor_interval
        assert stored[-1] == {"seen": 1}
        assert stored[-2] == {"seen": 0}
        count = len(stored)
        await trio.sleep(10)
        assert len(stored) == count  # nothing moved: no cursor batch
    assert len(stored) == count  # at stop: nothing new to store


async def test_no_cursor_is_stored_for_a_module_that_owns_its_position() -> None:
    class Owner(Seen):
        async def resume_after(self, ctx: ModuleContext) -> int | None:
            return None

    storage = MemoryStorage()
    async with open_ledger(
        config(), storage=storage, modules=[ModuleSpec(Owner(), durable=True)]
    ) as engine:
        await fill(engine, 3)
        await first_caught_up(engine, "seen")
        await engine.stop_all()
        assert await storage.load_cursors() == {}


class Exactly(Module):
    """Writes each delivered seq with its position in one transaction of its own SQLite db."""

    id = "exactly"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None

    async def init(self, ctx: ModuleContext) -> None:
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER NOT NULL)")

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        assert self.db is not None
        (last,) = self.db.execute("SELECT max(seq) FROM seen").fetchone()
        return None if last is None else int(last)

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert self.db is not None
        with self.db:
            self.db.execute("INSERT INTO seen (seq) VALUES (?)", (record.seq,))

    async def stop(self, ctx: ModuleContext) -> None:
        if self.db is not None:
            self.db.close()


async def test_resume_after_gives_exactly_once_with_an_own_table(tmp_path: Path) -> None:
    ledger, own = tmp_path / "l.db", tmp_path / "own.db"
    for round_ in range(3):
        async with open_ledger(
            config(),
            storage=SQLiteStorage(ledger),
            modules=[ModuleSpec(Exactly(own), durable=True)],
        ) as engine:
            await fill(engine, 4)
            if round_ == 1:  # leave without waiting: the next open catches up the rest
                continue
            await first_caught_up(engine, "exactly")
    with sqlite3.connect(own) as db:
        seqs = [s for (s,) in db.execute("SELECT seq FROM seen ORDER BY rowid")]
    assert seqs == list(range(12))


async def test_resume_after_beyond_the_head_is_a_crash() -> None:
    class Ahead(Seen):
        async def resume_after(self, ctx: ModuleContext) -> int | None:
            return 5

    with pytest.raises(ModuleError, match="beyond the head"):
        async with open_ledger(config(), modules=[ModuleSpec(Ahead(), durable=True)]):
            pass


async def test_an_ask_to_a_lagging_module_waits_for_the_length_at_the_ask(
    mock_clock: trio.testing.MockClock,
) -> None:
    module = Seen()
    async with open_ledger(config(), modules=[ModuleSpec(module, durable=True, inbox=1)]) as engine:
        module.hold = trio.Event()
        await fill(engine, 20)
        module.hold.set()
        seen = await engine.modules.get("seen").ask(lambda m: list(m.seqs))
        assert seen == list(range(20))
        await settle()


async def test_deliveries_read_back_by_an_ask_are_not_processed_twice(
    mock_clock: trio.testing.MockClock,
) -> None:
    """BLOCK: deliveries still held by a blocked append when an ask catches the module up
    arrive later as live deliveries below its position: they are skipped."""
    hold = trio.Event()
    module = Seen(hold=hold)
    async with open_ledger(
        config(), modules=[ModuleSpec(module, durable=True, inbox=1, overflow="block")]
    ) as engine:
        handle = engine.modules.get("seen")
        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(engine.append, rec(n))
            await settle()
            assert engine.state.length == 6  # committed; deliveries wait for room
            asked = trio.Event()

            async def ask() -> None:
                await handle.ask(lambda m: None)
                asked.set()

            nursery.start_soon(ask)
            await settle()
            hold.set()
            await asked.wait()
        await handle.ask(lambda m: None)
        assert module.seqs == list(range(6))
        assert handle.status.inbox_depth == 0


async def test_crash_during_catch_up_resumes_from_the_position(
    mock_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    async with open_ledger(config(), storage=storage) as engine:
        await fill(engine, 600)  # more than two catch-up chunks
    module = Seen()
    module.fail_at = 300  # while reading from storage
    async with open_ledger(
        config(), storage=storage, modules=[ModuleSpec(lambda: module, durable=True)]
    ) as engine:
        await trio.sleep(1)
        handle = engine.modules.get("seen")
        assert handle.status.restarts == 1
        assert handle.status.lag == 0
        assert module.seqs == list(range(600))  # the failed one once, after its restart


async def test_stop_during_catch_up_stores_the_progress(
    mock_clock: trio.testing.MockClock,
) -> None:
    storage = MemoryStorage()
    async with open_ledger(config(), storage=storage) as engine:
        await fill(engine, 600)

    class Stalls(Seen):
        async def after_append(self, record: Record, hash: Hash) -> None:
            if record.seq == 400:
                await trio.sleep_forever()
            await super().after_append(record, hash)

    first = Stalls()
    async with open_ledger(
        config(), storage=storage, modules=[ModuleSpec(first, durable=True, shutdown=1)]
    ) as engine:
        await trio.sleep(1)
        assert engine.modules.get("seen").status.cursor == 399
        # Killed at its shutdown deadline while stuck on seq 400: the cursor kept 399.
        await engine.stop_all()
        assert await storage.load_cursors() == {"seen": 399}
    second = Seen()
    async with open_ledger(
        config(), storage=storage, modules=[ModuleSpec(second, durable=True)]
    ) as engine:
        await first_caught_up(engine, "seen")
    assert first.seqs == list(range(400))
    assert second.seqs == list(range(400, 600))


async def test_the_fault_toolkit_checks_durable_modules_in_order_with_no_gap(
    mock_clock: trio.testing.MockClock,
) -> None:
    from nucleus_actors.testing import FaultPlan, Probe, open_tracked_ledger

    crashing = FaultPlan().crash("after_append", nth=3).wrap(Probe("crashing"))
    slow = FaultPlan().delay("after_append", 0.01).wrap(Probe("slow"))
    async with open_tracked_ledger(
        modules=[
            ModuleSpec(crashing, durable=True, inbox=2),
            ModuleSpec(slow, durable=True, inbox=2),
        ]
    ) as ledger:
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(fill, ledger, 25)
        await ledger.modules.get("slow").ask(lambda m: None)
        await ledger.modules.get("crashing").ask(lambda m: None)
    report = await ledger.check()
    assert report.complete == ("crashing", "slow")
    assert report.length == 100


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_stalled_durable_module_under_64_appending_tasks(
    backend: str, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The lag benchmark's shape in small: 64 tasks append while the module is stalled; its
    inbox never holds more than its bound, nothing is dropped, and once released it catches
    up from storage in order and ends with lag 0."""
    tasks, per_task, inbox = 64, 20, 8
    total = tasks * per_task
    hold = trio.Event()
    module = Seen(hold=hold)
    storage = MemoryStorage() if backend == "memory" else SQLiteStorage(tmp_path / "l.db")
    spec = ModuleSpec(module, durable=True, inbox=inbox)
    async with open_ledger(config(), storage=storage, modules=[spec]) as engine:
        handle = engine.modules.get("seen")
        depths: list[int] = []

        async def writer(k: int) -> None:
            for n in range(per_task):
                await engine.append(Record("t", {"k": k, "n": n}))
                depths.append(handle.status.inbox_depth)

        async with trio.open_nursery() as nursery:
            for k in range(tasks):
                nursery.start_soon(writer, k)
        status = handle.status
        assert module.seqs == []  # still stalled: every append went through without it
        assert (status.lag, status.cursor, status.dropped) == (total, None, 0)
        assert len(depths) == total
        assert max(depths) <= inbox
        hold.set()
        await handle.ask(lambda m: None)  # answered once caught up to the length
        assert module.seqs == list(range(total))
        assert (handle.status.lag, handle.status.cursor) == (0, total - 1)
        assert handle.status.inbox_depth == 0
