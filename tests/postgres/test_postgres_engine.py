"""The engine on `PostgresStorage`: a fenced engine stops writing, a standby engine follows,
a durable module resumes from the cursor stored in PostgreSQL after a takeover."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio

from nucleus_actors import (
    Fenced,
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    Module,
    ModuleSpec,
    Record,
    open_ledger,
)
from nucleus_actors.storage import PostgresStorage

LEDGER = "orders"


async def _sql(dsn: str, schema: str, query: str) -> list[tuple[Any, ...]]:
    def run() -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            return conn.execute(query).fetchall()

    return await trio.to_thread.run_sync(run)


@pytest.mark.parametrize("size", [1, 1000], ids=["append", "streamed-append_many"])
async def test_a_fenced_engine_stops_writing(pg_dsn: str, pg_schema: str, size: int) -> None:
    config = LedgerConfig(ledger_id=LEDGER)
    old = LedgerEngine(config, PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30))
    written, taken_over = trio.Event(), trio.Event()
    failures: list[BaseException] = []

    async def run_old() -> None:
        try:
            async with old:
                await old.init_all()
                await old.start_all()
                await old.append(Record("k", {"n": 0}))
                written.set()
                await taken_over.wait()
                with pytest.raises(Fenced, match="no longer current"):
                    await old.append_many([Record("k", {"n": 99 + i}) for i in range(size)])
                await trio.sleep_forever()  # the failure ends the block
        except LedgerFailed as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_old)
        await written.wait()
        await _sql(pg_dsn, pg_schema, "UPDATE lease SET expires_at = clock_timestamp() RETURNING 1")
        async with open_ledger(
            config, storage=PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
        ) as new:
            assert new.storage.epoch == 2  # type: ignore[attr-defined]
            await new.append(Record("k", {"n": 1}))
            taken_over.set()
            with trio.fail_after(10):
                while not failures:
                    await trio.sleep(0.01)
            await new.append(Record("k", {"n": 2}))
    assert old.fenced is not None
    assert old.fenced.current == 2
    assert "fenced" in str(failures[0])
    assert isinstance(failures[0].__cause__, Fenced)
    rows = await _sql(pg_dsn, pg_schema, "SELECT seq FROM entries ORDER BY seq")
    assert rows == [(0,), (1,), (2,)]


class Seen(Module):
    """A durable module that remembers the seqs it processed."""

    id = "seen"

    def __init__(self, seen: list[int]) -> None:
        self.seen = seen

    async def after_append(self, record: Record, head: Any) -> None:
        self.seen.append(record.seq)


async def test_a_standby_engine_follows_and_a_durable_module_resumes(
    pg_dsn: str, pg_schema: str
) -> None:
    config = LedgerConfig(ledger_id=LEDGER)
    first: list[int] = []
    writer = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    standby = LedgerEngine(config, PostgresStorage(pg_dsn, schema=pg_schema, standby=True))
    async with (
        open_ledger(
            config, storage=writer, modules=[ModuleSpec(Seen(first), durable=True)]
        ) as engine,
        standby,
    ):
        await standby.init_all()
        await standby.start_all()
        for n in range(5):
            await engine.append(Record("k", {"n": n}))
        assert await standby.refresh() == 5
        assert standby.state.length == 5
        assert standby.state.head == engine.state.head
        assert [e.seq async for e in standby.read(0)] == [0, 1, 2, 3, 4]
        with trio.fail_after(10):
            while len(first) < 5:
                await trio.sleep(0.01)
        await engine.stop_all()
    # the writer closed (its lease released, its cursor stored): a new writer takes over and
    # its durable module resumes after the stored cursor, not from seq 0
    second: list[int] = []
    async with open_ledger(
        config,
        storage=PostgresStorage(pg_dsn, schema=pg_schema),
        modules=[ModuleSpec(Seen(second), durable=True)],
    ) as engine:
        assert engine.storage.epoch == 2  # type: ignore[attr-defined]
        await engine.append(Record("k", {"n": 5}))
        with trio.fail_after(10):
            while not second:
                await trio.sleep(0.01)
    assert second == [5]
