"""`PostgresStorage.append_stream`: a batch COPYed while it is still being hashed, in the same
fenced transaction as `append`, with the same rules and errors."""

from __future__ import annotations

import psycopg
import pytest
import trio

from nucleus_actors import Fenced, LedgerConfig, Record, StorageError, open_ledger
from nucleus_actors.storage import AppendStreams, PostgresStorage, StorageBatch, TreeTile
from nucleus_actors.storage.postgres import verify_schema
from nucleus_actors.testing import make_entries

from .test_postgres_storage import _expire, _rows

LEDGER = "orders"


async def _writer(dsn: str, schema: str, lease_timeout: float = 30) -> PostgresStorage:
    storage = PostgresStorage(dsn, schema=schema, lease_timeout=lease_timeout)
    await storage.open(LEDGER)
    return storage


async def _stored(dsn: str, schema: str) -> list[tuple[object, ...]]:
    return await _rows(dsn, schema, "SELECT seq, hash FROM entries ORDER BY seq")


async def test_a_streamed_batch_is_stored_as_append_stores_it(pg_dsn: str, pg_schema: str) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    assert isinstance(storage, AppendStreams)
    entries = make_entries(LEDGER, 0, 700)
    tile = TreeTile(level=0, index=0, hashes=bytes(32) * 3)
    async with storage.append_stream() as stream:
        for first in range(0, 700, 128):
            stream.feed(entries[first : first + 128])
            await trio.sleep(0.01)  # the caller hashing: PostgreSQL works meanwhile
        await stream.commit(StorageBatch(entries=entries, cursors={"m": 699}, tree=[tile]))
    assert await _stored(pg_dsn, pg_schema) == [(e.seq, bytes(e.hash)) for e in entries]
    assert await _rows(pg_dsn, pg_schema, "SELECT module, seq FROM cursors") == [("m", 699)]
    assert await storage.read_tiles([(0, 0)]) == {(0, 0): tile}
    assert await storage.head() == (700, entries[-1].hash)
    # the connection is back to normal: a plain append and another stream follow
    more = make_entries(LEDGER, 700, 300, entries[-1].hash)
    await storage.append(StorageBatch(entries=more[:10], prev=entries[-1].hash))
    async with storage.append_stream() as stream:
        stream.feed(more[10:])
        await stream.commit(StorageBatch(entries=more[10:], prev=more[9].hash))
    assert (await storage.head())[0] == 1000
    await storage.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 1000


async def test_leaving_the_block_without_commit_stores_nothing(pg_dsn: str, pg_schema: str) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 300)
    async with storage.append_stream() as stream:
        stream.feed(entries[:200])
        await trio.sleep(0.05)  # the COPY has started and taken rows
    with pytest.raises(ZeroDivisionError):
        async with storage.append_stream() as stream:
            stream.feed(entries[:100])
            1 / 0  # noqa: B018
    with trio.move_on_after(0.05):
        async with storage.append_stream() as stream:
            stream.feed(entries[:100])
            await trio.sleep_forever()
    assert await _stored(pg_dsn, pg_schema) == []
    # nothing is left open on the connection: both ways of writing still work
    await storage.append(StorageBatch(entries=entries[:100]))
    async with storage.append_stream() as stream:
        stream.feed(entries[100:])
        await stream.commit(StorageBatch(entries=entries[100:], prev=entries[99].hash))
    assert await _stored(pg_dsn, pg_schema) == [(e.seq, bytes(e.hash)) for e in entries]
    await storage.close()


async def test_commit_refuses_a_batch_other_than_the_entries_fed(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 300)
    async with storage.append_stream() as stream:
        stream.feed(entries[:200])
        with pytest.raises(StorageError, match=r"batch's 300 entries are not the 200 fed"):
            await stream.commit(StorageBatch(entries=entries))
    async with storage.append_stream() as stream:  # not contiguous with the head
        stream.feed(entries[1:])
        with pytest.raises(StorageError, match=r"seq"):
            await stream.commit(StorageBatch(entries=entries[1:], prev=entries[0].hash))
    assert await _stored(pg_dsn, pg_schema) == []
    async with storage.append_stream() as stream:
        stream.feed(entries)
        await stream.commit(StorageBatch(entries=entries))
        with pytest.raises(StorageError, match=r"after commit"):
            stream.feed(entries)
    assert len(await _stored(pg_dsn, pg_schema)) == 300
    await storage.close()


async def test_a_stream_of_a_replaced_writer_is_fenced(pg_dsn: str, pg_schema: str) -> None:
    old = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 400)
    await old.append(StorageBatch(entries=entries[:100]))
    # the old writer freezes; its lease expires and a new writer takes over and appends
    await _expire(pg_dsn, pg_schema)
    new = await _writer(pg_dsn, pg_schema)
    await new.append(StorageBatch(entries=entries[100:150], prev=entries[99].hash))
    # the old writer wakes up and streams its next batch: the fence refuses it at commit
    async with old.append_stream() as stream:
        stream.feed(entries[100:400])
        with pytest.raises(Fenced, match=r"epoch 1 is no longer current \(epoch 2") as caught:
            await stream.commit(StorageBatch(entries=entries[100:400], prev=entries[99].hash))
    assert (caught.value.epoch, caught.value.current) == (1, 2)
    assert old.fenced is not None
    assert await _stored(pg_dsn, pg_schema) == [(e.seq, bytes(e.hash)) for e in entries[:150]]
    with pytest.raises(Fenced):
        async with old.append_stream():
            pass
    await old.close()
    await new.close()


async def test_a_row_stored_behind_the_writers_back_refuses_the_stream(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 400)
    await storage.append(StorageBatch(entries=entries[:100]))
    intruder = entries[100]
    await _rows(
        pg_dsn,
        pg_schema,
        f"INSERT INTO entries VALUES ({intruder.seq}, '\\x00', '\\x{bytes(intruder.hash).hex()}') "
        "RETURNING seq",
    )
    async with storage.append_stream() as stream:
        stream.feed(entries[100:])
        with pytest.raises(StorageError, match=r"append refused: the stored last entry is"):
            await stream.commit(StorageBatch(entries=entries[100:], prev=entries[99].hash))
    assert len(await _stored(pg_dsn, pg_schema)) == 101  # the intruder's row, nothing of ours
    await storage.close()


async def test_a_connection_killed_mid_stream_stores_nothing_and_the_next_write_reconnects(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 600)
    await storage.append(StorageBatch(entries=entries[:100]))
    async with storage.append_stream() as stream:
        stream.feed(entries[100:300])
        await trio.sleep(0.05)
        await _rows(
            pg_dsn,
            pg_schema,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
            f"'{f'nucleus_actors {storage.holder}'[:63]}' AND pid <> pg_backend_pid()",
        )
        await trio.sleep(0.05)
        stream.feed(entries[300:600])
        with pytest.raises(StorageError, match=r"append failed, nothing stored"):
            await stream.commit(StorageBatch(entries=entries[100:], prev=entries[99].hash))
    assert len(await _stored(pg_dsn, pg_schema)) == 100
    await storage.append(StorageBatch(entries=entries[100:], prev=entries[99].hash))
    assert len(await _stored(pg_dsn, pg_schema)) == 600
    await storage.close()


async def test_append_many_on_postgres_streams_large_batches(pg_dsn: str, pg_schema: str) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    appends: list[int] = []
    plain = storage.append

    async def counted(batch: StorageBatch) -> None:
        appends.append(len(batch.entries))
        await plain(batch)

    storage.append = counted  # type: ignore[method-assign]
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=storage) as ledger:
        await ledger.append(Record("k", {"n": -1}))
        receipts = await ledger.append_many([Record("k", {"n": n}) for n in range(1000)])
        assert [r.seq for r in receipts] == list(range(1, 1001))
        small = await ledger.append_many([Record("k", {"n": n}) for n in range(10)])
        assert small[0].seq == 1001
        # the 1000-record batch went through the stream, the small ones through append
        assert appends == [1, 10]
        assert await ledger.verify()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 1011


async def test_psycopg_is_the_driver(pg_dsn: str) -> None:
    # the stream drives libpq itself: it relies on psycopg keeping connections non-blocking
    with psycopg.connect(pg_dsn) as conn:
        assert conn.pgconn.nonblocking == 1
