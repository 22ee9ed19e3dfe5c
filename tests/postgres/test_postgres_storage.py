"""`PostgresStorage` beyond the conformance suite: fencing, migrations, connection errors."""

from __future__ import annotations

import contextlib

import psycopg
import pytest
import trio

from nucleus_actors import Fenced, IntegrityError, StorageError
from nucleus_actors.hashing import genesis
from nucleus_actors.storage import PostgresStorage, StorageBatch
from nucleus_actors.storage.postgres import _SCHEMA_1, FORMAT_VERSION, verify_schema
from nucleus_actors.testing import make_entries

LEDGER = "orders"


async def _rows(dsn: str, schema: str, query: str) -> list[tuple[object, ...]]:
    def run() -> list[tuple[object, ...]]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            return conn.execute(query).fetchall()

    return await trio.to_thread.run_sync(run)


async def _expire(dsn: str, schema: str) -> None:
    """Make the lease expire now, as if its writer had stopped renewing it long ago."""
    await _rows(dsn, schema, "UPDATE lease SET expires_at = clock_timestamp() RETURNING 1")


async def _take_over(dsn: str, schema: str) -> PostgresStorage:
    """A new writer (lease 1 s), opened as soon as it can take the lease (within 15 s)."""
    new = PostgresStorage(dsn, schema=schema, lease_timeout=1.0)
    with trio.fail_after(15):
        while True:
            try:
                await new.open(LEDGER)
                return new
            except Fenced:
                await trio.sleep(0.2)


async def test_a_second_writer_cannot_take_a_valid_lease(pg_dsn: str, pg_schema: str) -> None:
    first = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    await first.open(LEDGER)
    assert first.epoch == 1
    second = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    with pytest.raises(Fenced, match=r"holds its lease at epoch 1 for another") as caught:
        await second.open(LEDGER)
    assert caught.value.current == 1
    assert second.epoch is None
    # the refused writer holds nothing: the first still writes
    await first.append(StorageBatch(entries=make_entries(LEDGER, 0, 2)))
    await first.close()
    # a closed writer releases the lease: the next one takes epoch 2 at once
    await second.open(LEDGER)
    assert second.epoch == 2
    assert (await second.head())[0] == 2
    await second.close()


async def test_after_expiry_a_new_writer_fences_the_old_one(pg_dsn: str, pg_schema: str) -> None:
    old = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    await old.open(LEDGER)
    entries = make_entries(LEDGER, 0, 6)
    await old.append(StorageBatch(entries=entries[:2], cursors={"m": 1}))
    await _expire(pg_dsn, pg_schema)
    new = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    await new.open(LEDGER)
    assert (new.epoch, old.epoch) == (2, 1)
    assert await new.head() == (2, entries[1].hash)
    await new.append(StorageBatch(entries=entries[2:4], prev=entries[1].hash))
    # the old writer's batch (built on its own head) is refused by the fence: nothing stored
    with pytest.raises(Fenced, match=r"epoch 1 is no longer current \(epoch 2") as caught:
        await old.append(
            StorageBatch(entries=make_entries(LEDGER, 2, 2, entries[1].hash), cursors={"m": 3})
        )
    assert (caught.value.epoch, caught.value.current) == (1, 2)
    assert old.fenced is not None
    assert await old.wait_lost() is old.fenced
    # every later write of the old writer is refused at once, renewals too
    with pytest.raises(Fenced):
        await old.append(StorageBatch(entries=[], cursors={"m": 1}))
    with pytest.raises(Fenced):
        await old.renew()
    with pytest.raises(Fenced):
        await old.prune_idempotency(10**18)
    rows = await _rows(pg_dsn, pg_schema, "SELECT seq, hash FROM entries ORDER BY seq")
    assert rows == [(e.seq, bytes(e.hash)) for e in entries[:4]]
    assert await _rows(pg_dsn, pg_schema, "SELECT module, seq FROM cursors") == [("m", 1)]
    # the fenced writer still reads (the database's head)
    assert await old.head() == (4, entries[3].hash)
    await old.close()  # must not release the new writer's lease
    lease = await new.lease()
    assert lease.epoch == 2
    assert lease.holder == new.holder
    assert lease.remaining > 20
    await new.close()


async def test_renewal_keeps_the_lease_and_notices_a_takeover(pg_dsn: str, pg_schema: str) -> None:
    writer = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=0.6)
    await writer.open(LEDGER)
    before = writer.renewed_at
    with trio.fail_after(10):
        while writer.renewed_at == before:  # the renewal task runs every lease/3
            await trio.sleep(0.05)
    standby = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=0.6, standby=True)
    await standby.open(LEDGER)
    with pytest.raises(Fenced, match="holds its lease"):
        await standby.acquire()
    with pytest.raises(Fenced, match="standby"):
        await standby.append(StorageBatch(entries=make_entries(LEDGER, 0, 1)))
    # someone forces a takeover behind the writer's back: its renewal task notices
    await _rows(pg_dsn, pg_schema, "UPDATE lease SET epoch = epoch + 1, holder = 'x' RETURNING 1")
    with trio.fail_after(10):
        lost = await writer.wait_lost()
    assert lost.current == writer.epoch + 1  # type: ignore[operator]
    await writer.close()
    await standby.close()


async def test_a_standby_follows_the_head_and_takes_over(pg_dsn: str, pg_schema: str) -> None:
    writer = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    await writer.open(LEDGER)
    standby = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30, standby=True)
    await standby.open(LEDGER)
    assert standby.epoch is None
    assert await standby.head() == (0, genesis(LEDGER))
    entries = make_entries(LEDGER, 0, 5)
    await writer.append(StorageBatch(entries=entries[:3]))
    assert await standby.head() == (3, entries[2].hash)
    assert [e async for e in standby.read(0)] == entries[:3]
    await writer.close()
    assert await standby.acquire() == 2
    assert standby.epoch == 2
    await standby.append(StorageBatch(entries=entries[3:], prev=entries[2].hash))
    assert [e async for e in standby.read(0)] == entries
    await standby.close()


async def test_a_frozen_transaction_does_not_block_the_takeover(
    pg_dsn: str, pg_schema: str
) -> None:
    """A writer session idle inside a transaction that holds the lease row is cut off by the
    server (idle_in_transaction_session_timeout below the lease), so the takeover proceeds."""
    writer = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=1.0)
    await writer.open(LEDGER)
    await writer.append(StorageBatch(entries=make_entries(LEDGER, 0, 1)))

    def freeze() -> None:  # what a SIGSTOP between two statements leaves behind
        conn = writer._writer()
        conn.execute("BEGIN")
        conn.execute("SELECT epoch FROM lease FOR UPDATE")

    await trio.to_thread.run_sync(freeze, limiter=writer._limiter)
    if writer._renewer is not None:
        writer._renewer.cancel()  # the frozen process renews nothing
    new = await _take_over(pg_dsn, pg_schema)
    assert new.epoch == 2
    with pytest.raises(StorageError):  # its session was terminated, or fenced: never stored
        await writer.append(StorageBatch(entries=make_entries(LEDGER, 1, 1, (await new.head())[1])))
    await new.append(StorageBatch(entries=make_entries(LEDGER, 1, 1, (await new.head())[1])))
    assert (await new.head())[0] == 2
    await writer.close()
    await new.close()


@pytest.mark.parametrize("how", ["append_stream", "copy"])
async def test_a_writer_frozen_inside_its_copy_does_not_block_the_takeover(
    pg_dsn: str, pg_schema: str, how: str
) -> None:
    """PostgreSQL waiting for a client's COPY data is neither idle in transaction nor subject
    to statement_timeout: a writer frozen there would hold the lease row forever. The new
    writer ends the expired holder's sessions, then takes over."""
    writer = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=1.0)
    await writer.open(LEDGER)
    entries = make_entries(LEDGER, 0, 300)
    await writer.append(StorageBatch(entries=entries[:1]))
    if writer._renewer is not None:
        writer._renewer.cancel()  # the frozen process renews nothing
    held: list[object] = []  # the frozen COPY's objects, kept (not garbage-collected)
    if how == "append_stream":
        stream_cm = writer.append_stream()
        stream = await stream_cm.__aenter__()
        stream.feed(entries[1:100])  # the COPY runs; the writer freezes here
    else:

        def frozen_copy() -> None:  # what a SIGSTOP inside copy.write_row leaves behind
            conn = writer._writer()
            conn.execute("BEGIN")
            conn.execute("UPDATE lease SET expires_at = expires_at WHERE ledger_id = %s", (LEDGER,))
            copy_cm = conn.cursor().copy("COPY entries (seq, canonical, hash) FROM STDIN")
            held.extend([copy_cm, copy_cm.__enter__()])

        await trio.to_thread.run_sync(frozen_copy, limiter=writer._limiter)
    new = await _take_over(pg_dsn, pg_schema)
    assert new.epoch == 2
    head = await new.head()
    assert head[0] == 1  # nothing of the frozen batch
    await new.append(StorageBatch(entries=make_entries(LEDGER, 1, 5, head[1])))
    assert (await new.head())[0] == 6
    if how == "append_stream":
        with pytest.raises(StorageError):  # its session was ended: never stored
            await stream.commit(StorageBatch(entries=entries[1:100], prev=entries[0].hash))
        await stream_cm.__aexit__(None, None, None)
    else:  # the frozen thread "wakes up": its COPY fails (the session was ended)

        def wake() -> None:
            with contextlib.suppress(Exception):
                held[0].__exit__(None, None, None)  # type: ignore[attr-defined]

        await trio.to_thread.run_sync(wake)
    await new.close()
    with contextlib.suppress(Exception):
        await writer.close()


async def test_a_format_1_schema_is_migrated(pg_dsn: str, pg_schema: str) -> None:
    entries = make_entries(LEDGER, 0, 3)

    def write_v1() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{pg_schema}"')
            conn.execute(f'SET search_path TO "{pg_schema}"')
            for statement in _SCHEMA_1:
                conn.execute(statement)
            conn.cursor().executemany(
                "INSERT INTO meta VALUES (%s, %s)",
                [
                    ("format_version", "1"),
                    ("ledger_id", LEDGER),
                    ("hash_scheme", "blake3-jcs-chain/1"),
                    ("created_by", "test"),
                ],
            )
            conn.cursor().executemany(
                "INSERT INTO entries VALUES (%s, %s, %s)",
                [(e.seq, e.canonical, bytes(e.hash)) for e in entries],
            )

    await trio.to_thread.run_sync(write_v1)
    storage = PostgresStorage(pg_dsn, schema=pg_schema)
    await storage.open(LEDGER)
    assert await storage.head() == (3, entries[-1].hash)
    assert await storage.load_cursors() == {}
    await storage.append(StorageBatch(entries=[], cursors={"a": 2}))
    await storage.close()
    meta = dict(await _rows(pg_dsn, pg_schema, "SELECT key, value FROM meta"))  # type: ignore[arg-type]
    assert meta["format_version"] == str(FORMAT_VERSION) == "2"
    assert meta["migrated_by"].startswith("nucleus_actors")


async def test_concurrent_opens_migrate_once(pg_dsn: str, pg_schema: str) -> None:
    storages = [PostgresStorage(pg_dsn, schema=pg_schema, standby=True) for _ in range(4)]
    async with trio.open_nursery() as nursery:
        for storage in storages:
            nursery.start_soon(storage.open, LEDGER)
    for storage in storages:
        assert await storage.head() == (0, genesis(LEDGER))
        await storage.close()


async def test_schema_errors(pg_dsn: str, pg_schema: str) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema)
    await storage.open(LEDGER)
    await storage.close()
    other = PostgresStorage(pg_dsn, schema=pg_schema)
    with pytest.raises(
        StorageError, match=r"belongs to ledger 'orders', cannot open it as ledger 'x'"
    ):
        await other.open("x")
    await _rows(
        pg_dsn, pg_schema, "UPDATE meta SET value = '9' WHERE key = 'format_version' RETURNING 1"
    )
    with pytest.raises(StorageError, match="format version 9, newer than this build"):
        await other.open(LEDGER)
    with pytest.raises(ValueError, match="schema must be an identifier"):
        PostgresStorage(pg_dsn, schema="bad-name")
    with pytest.raises(ValueError, match="lease_timeout must be a number"):
        PostgresStorage(pg_dsn, lease_timeout=0)


async def test_a_broken_tail_is_an_integrity_error(pg_dsn: str, pg_schema: str) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema)
    await storage.open(LEDGER)
    await storage.append(StorageBatch(entries=make_entries(LEDGER, 0, 3)))
    await storage.close()
    await _rows(
        pg_dsn,
        pg_schema,
        "UPDATE entries SET hash = '\\x00'::bytea || substr(hash, 2) WHERE seq = 2 RETURNING 1",
    )
    with pytest.raises(IntegrityError, match="entry 2"):
        await storage.open(LEDGER)


@pytest.mark.parametrize(
    ("dsn", "match"),
    [
        (
            "postgresql://postgres@127.0.0.1:5432/no_such_db_nucleus",
            'database "no_such_db_nucleus" does not exist',
        ),
        (
            "postgresql://nobody_nucleus:secret@127.0.0.1:5432/test",
            'role "nobody_nucleus" does not exist',
        ),
        ("postgresql://postgres@127.0.0.1:1/test", "cannot connect to PostgreSQL .*port=1"),
        ("host=127.0.0.1 port=5432 bogus_option=1", "bad connection string"),
    ],
)
async def test_connection_errors_are_clear(
    pg_dsn: str, pg_schema: str, dsn: str, match: str
) -> None:
    storage = PostgresStorage(dsn, schema=pg_schema, connect_timeout=2)
    with pytest.raises(StorageError, match=match) as caught:
        await storage.open(LEDGER)
    assert "secret" not in str(caught.value)


async def test_verify_schema_checks_the_whole_chain(pg_dsn: str, pg_schema: str) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema)
    await storage.open(LEDGER)
    entries = make_entries(LEDGER, 0, 1500)
    await storage.append(StorageBatch(entries=entries))
    seen: list[tuple[int, int]] = []
    assert await verify_schema(
        pg_dsn, schema=pg_schema, progress=lambda d, t: seen.append((d, t))
    ) == (
        LEDGER,
        1500,
        entries[-1].hash,
    )
    assert seen[-1] == (1500, 1500)
    await storage.close()
    await _rows(
        pg_dsn,
        pg_schema,
        "UPDATE entries SET hash = '\\x00'::bytea || substr(hash, 2) WHERE seq = 700 RETURNING 1",
    )
    with pytest.raises(IntegrityError) as caught:
        await verify_schema(pg_dsn, schema=pg_schema)
    assert caught.value.seq == 700
    with pytest.raises(StorageError, match="holds no nucleus_actors ledger"):
        await verify_schema(pg_dsn, schema="t_no_such_schema_here")
