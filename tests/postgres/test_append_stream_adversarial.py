"""Adversarial tests of `PostgresStorage.append_stream` (and the pipeline path that uses it):
a killed backend at different moments, server timeouts while the caller is slow, takeovers
racing the stream, conflicting rows, very large COPY data, cancellation everywhere, streams
interleaved with plain and cursor-only appends, and the engine under concurrent load."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import psycopg
import pytest
import trio
import trio.lowlevel

from nucleus_actors import (
    CommitUnknown,
    Entry,
    Fenced,
    Hash,
    LedgerConfig,
    Record,
    StorageError,
    open_ledger,
)
from nucleus_actors.hashing import canonical_bytes, chain_step, genesis
from nucleus_actors.storage import PostgresStorage, StorageBatch
from nucleus_actors.storage.postgres import verify_schema
from nucleus_actors.testing import make_entries

from .test_append_stream import _writer
from .test_postgres_storage import _expire, _rows

LEDGER = "orders"


# -- helpers -------------------------------------------------------------------------------
async def _count(dsn: str, schema: str) -> int:
    (count,) = (await _rows(dsn, schema, "SELECT count(*) FROM entries"))[0]
    assert isinstance(count, int)
    return count


async def _exec(dsn: str, schema: str, *statements: str) -> None:
    def run() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'SET search_path TO "{schema}"')
            for statement in statements:
                conn.execute(statement)

    await trio.to_thread.run_sync(run)


def _kill_sync(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


async def _kill(dsn: str, storage: PostgresStorage) -> None:
    """Terminate the writer connection's backend (PostgreSQL side)."""
    pid = storage._conn.pgconn.backend_pid
    await trio.to_thread.run_sync(_kill_sync, dsn, pid)


async def _idle(storage: PostgresStorage) -> bool:
    """The writer connection holds no transaction and no command (or is gone: replaced),
    checked under its limiter (the lease renewal task uses it too)."""
    async with storage._limiter:
        return _idle_now(storage)


def _idle_now(storage: PostgresStorage) -> bool:
    conn = storage._conn
    if conn is None or conn.closed or conn.broken:
        return True
    return bool(conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE)


def _big_entries(start: int, count: int, prev: Hash | None, size: int) -> list[Entry]:
    """Entries whose records carry `size` bytes of incompressible text each."""
    head = genesis(LEDGER) if prev is None else prev
    out = []
    for seq in range(start, start + count):
        blob = os.urandom(size // 2).hex()
        record = Record("k", {"n": seq, "blob": blob}, seq=seq, timestamp=1_000 + seq)
        data = canonical_bytes(record)
        head = chain_step(head, seq, data)
        out.append(Entry(seq, record, head, data))
    return out


class _Ticker:
    """A task that ticks every millisecond: the largest gap shows how long the event loop
    was blocked."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.ticks = 0

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await trio.sleep(0.001)
            now = time.perf_counter()
            self.gaps.append(now - last)
            self.ticks += 1
            last = now

    @property
    def worst(self) -> float:
        return max(self.gaps, default=0.0)


async def _stream(
    storage: PostgresStorage,
    entries: Sequence[Entry],
    prev: Hash | None,
    slice_: int = 128,
    cursors: dict[str, int] | None = None,
) -> None:
    async with storage.append_stream() as stream:
        for first in range(0, len(entries), slice_):
            stream.feed(entries[first : first + slice_])
            await trio.lowlevel.checkpoint()
        await stream.commit(StorageBatch(entries=list(entries), prev=prev, cursors=cursors or {}))


# -- a killed backend ----------------------------------------------------------------------
async def test_backend_killed_before_the_opening_answer_is_read(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 600)
    await storage.append(StorageBatch(entries=entries[:100]))
    async with storage.append_stream() as stream:
        # the opening query is sent, its answers not read yet: kill the backend now
        _kill_sync(pg_dsn, storage._conn.pgconn.backend_pid)
        stream.feed(entries[100:300])
        stream.feed(entries[300:600])
        with pytest.raises(StorageError, match=r"nothing stored") as caught:
            await stream.commit(StorageBatch(entries=entries[100:], prev=entries[99].hash))
        assert not isinstance(caught.value, CommitUnknown)
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 100
    assert await storage.head() == (100, entries[99].hash)
    # the next stream reconnects and stores
    await _stream(storage, entries[100:], entries[99].hash)
    assert await _count(pg_dsn, pg_schema) == 600
    await storage.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 600


async def test_backend_killed_with_megabytes_of_copy_data_queued(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = _big_entries(0, 60, None, 200_000)
    ticker = _Ticker()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        async with storage.append_stream() as stream:
            stream.feed(entries[:30])  # ~6 MB: far more than the socket buffers hold
            await trio.sleep(0.02)
            await _kill(pg_dsn, storage)
            stream.feed(entries[30:])
            with pytest.raises(StorageError, match=r"nothing stored") as caught:
                await stream.commit(StorageBatch(entries=entries))
            assert not isinstance(caught.value, CommitUnknown)
        nursery.cancel_scope.cancel()
    assert ticker.worst < 0.5, ticker.worst
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 0
    await _stream(storage, entries, None, slice_=10)
    assert await _count(pg_dsn, pg_schema) == 60
    await storage.close()


async def test_backend_killed_during_the_tail_stores_nothing(pg_dsn: str, pg_schema: str) -> None:
    """The COPY is over; the cursor upsert waits on a row lock another session holds; the
    backend is killed then (the worker thread is in the tail)."""
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 301)
    await storage.append(StorageBatch(entries=entries[:1], cursors={"m": 0}))
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn, autocommit=True))
    try:
        blocker.execute(f'SET search_path TO "{pg_schema}"')
        blocker.execute("BEGIN")
        blocker.execute("SELECT * FROM cursors WHERE module = 'm' FOR UPDATE")
        pid = storage._conn.pgconn.backend_pid

        async def kill_when_waiting() -> None:
            while True:
                rows = await _rows(
                    pg_dsn,
                    pg_schema,
                    f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {pid}",
                )
                if rows and rows[0][0] == "Lock":
                    break
                await trio.sleep(0.005)
            await trio.to_thread.run_sync(_kill_sync, pg_dsn, pid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_when_waiting)
            with pytest.raises(StorageError, match=r"nothing stored") as caught:
                await _stream(storage, entries[1:], entries[0].hash, cursors={"m": 300})
        assert not isinstance(caught.value, CommitUnknown)
    finally:
        await trio.to_thread.run_sync(blocker.close)
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 1
    await _stream(storage, entries[1:], entries[0].hash, cursors={"m": 300})
    assert await _count(pg_dsn, pg_schema) == 301
    assert await _rows(pg_dsn, pg_schema, "SELECT seq FROM cursors") == [(300,)]
    await storage.close()


async def test_lock_timeout_in_the_tail_stores_nothing_and_the_connection_is_reusable(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema, lease_timeout=1.5)  # lock_timeout 500 ms
    entries = make_entries(LEDGER, 0, 301)
    await storage.append(StorageBatch(entries=entries[:1], cursors={"m": 0}))
    prev, entries = entries[0].hash, entries[1:]
    blocker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn, autocommit=True))
    try:
        blocker.execute(f'SET search_path TO "{pg_schema}"')
        blocker.execute("BEGIN")
        blocker.execute("SELECT * FROM cursors WHERE module = 'm' FOR UPDATE")
        with pytest.raises(StorageError, match=r"nothing stored") as caught:
            async with storage.append_stream() as stream:
                stream.feed(entries)
                await stream.commit(StorageBatch(entries=entries, prev=prev, cursors={"m": 300}))
        assert not isinstance(caught.value, CommitUnknown)
    finally:
        await trio.to_thread.run_sync(blocker.close)
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 1
    async with storage.append_stream() as stream:
        stream.feed(entries)
        await stream.commit(StorageBatch(entries=entries, prev=prev, cursors={"m": 300}))
    assert await _rows(pg_dsn, pg_schema, "SELECT seq FROM cursors") == [(300,)]
    await storage.close()


# -- server timeouts while the caller is slow ----------------------------------------------
async def test_statement_timeout_while_the_caller_is_slow_between_slices(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema, lease_timeout=1)  # statement_timeout 500 ms
    entries = make_entries(LEDGER, 0, 400)
    async with storage.append_stream() as stream:
        stream.feed(entries[:128])
        await trio.sleep(0.8)  # slower than statement_timeout
        stream.feed(entries[128:])
        with pytest.raises(StorageError, match=r"nothing stored") as caught:
            await stream.commit(StorageBatch(entries=entries))
        assert not isinstance(caught.value, CommitUnknown)
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 0
    # the lease renewal task still works and the next writes go through
    before = storage.renewed_at
    await trio.sleep(0.6)
    assert before is not None
    assert storage.renewed_at is not None
    assert storage.renewed_at > before
    assert storage.fenced is None
    await _stream(storage, entries, None)
    await storage.append(StorageBatch(entries=[], cursors={"m": 1}))
    assert await _count(pg_dsn, pg_schema) == 400
    lease = await storage.lease()
    assert lease.remaining > 0
    await storage.close()


async def test_slow_caller_before_the_first_feed(pg_dsn: str, pg_schema: str) -> None:
    """The opening query ran long ago, nothing fed yet: timeouts cut the session."""
    storage = await _writer(pg_dsn, pg_schema, lease_timeout=1)
    entries = make_entries(LEDGER, 0, 300)
    async with storage.append_stream() as stream:
        await trio.sleep(0.8)
        stream.feed(entries)
        with pytest.raises(StorageError):
            await stream.commit(StorageBatch(entries=entries))
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 0
    await _stream(storage, entries, None)
    assert await _count(pg_dsn, pg_schema) == 300
    await storage.close()


# -- takeovers racing the stream -----------------------------------------------------------
async def test_a_takeover_committed_while_the_fence_waits_fences_the_stream(
    pg_dsn: str, pg_schema: str
) -> None:
    old = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 400)
    await old.append(StorageBatch(entries=entries[:100]))
    taker = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn, autocommit=True))
    try:
        taker.execute(f'SET search_path TO "{pg_schema}"')
        taker.execute("BEGIN")
        taker.execute("UPDATE lease SET epoch = epoch + 1, holder = 'taker'")
        async with old.append_stream() as stream:
            stream.feed(entries[100:250])
            await trio.sleep(0.05)  # the fence waits on the taker's row lock
            await trio.to_thread.run_sync(taker.execute, "COMMIT")
            stream.feed(entries[250:])
            with pytest.raises(Fenced) as caught:
                await stream.commit(StorageBatch(entries=entries[100:], prev=entries[99].hash))
        assert (caught.value.epoch, caught.value.current) == (1, 2)
    finally:
        await trio.to_thread.run_sync(taker.close)
    assert await _count(pg_dsn, pg_schema) == 100
    assert old.fenced is not None
    await old.close()


async def test_a_new_writer_cannot_take_over_while_a_stream_holds_the_fence(
    pg_dsn: str, pg_schema: str
) -> None:
    old = await _writer(pg_dsn, pg_schema, lease_timeout=3)
    entries = make_entries(LEDGER, 0, 400)
    await old.append(StorageBatch(entries=entries[:100]))
    await _expire(pg_dsn, pg_schema)  # the lease ran out; the old writer streams anyway
    async with old.append_stream() as stream:
        stream.feed(entries[100:200])
        await trio.sleep(0.05)  # the fence renewed the lease and holds its row
        new = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=3)
        with pytest.raises((Fenced, StorageError)):
            await new.open(LEDGER)  # the row lock: lock_timeout, or the renewed lease
        stream.feed(entries[200:])
        await stream.commit(StorageBatch(entries=entries[100:], prev=entries[99].hash))
    assert await _count(pg_dsn, pg_schema) == 400
    assert old.fenced is None
    await old.append(StorageBatch(entries=[], cursors={"m": 3}))
    await old.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 400


# -- conflicting rows ----------------------------------------------------------------------
async def test_a_conflicting_row_committed_during_the_copy(pg_dsn: str, pg_schema: str) -> None:
    """Another session inserts the stream's next seq after the tail check: the COPY waits on
    it, then hits the unique index; nothing of the stream is stored, the loop stays live."""
    storage = await _writer(pg_dsn, pg_schema)
    entries = _big_entries(0, 40, None, 100_000)
    await storage.append(StorageBatch(entries=entries[:10]))
    intruder = await trio.to_thread.run_sync(lambda: psycopg.connect(pg_dsn, autocommit=True))
    ticker = _Ticker()
    try:
        intruder.execute(f'SET search_path TO "{pg_schema}"')
        intruder.execute("BEGIN")
        intruder.execute(
            "INSERT INTO entries VALUES (%s, '\\x00', %s)", (10, bytes(entries[10].hash))
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker.run)
            async with storage.append_stream() as stream:
                stream.feed(entries[10:25])
                await trio.sleep(0.05)
                stream.feed(entries[25:])  # ~3 MB behind a COPY that waits on a lock
                await trio.sleep(0.05)
                await trio.to_thread.run_sync(intruder.execute, "COMMIT")
                with pytest.raises(StorageError, match=r"nothing stored"):
                    await stream.commit(StorageBatch(entries=entries[10:], prev=entries[9].hash))
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(intruder.close)
    assert ticker.worst < 0.5, ticker.worst
    assert await _idle(storage)
    assert await _count(pg_dsn, pg_schema) == 11  # ours and the intruder's row
    await storage.close()


# -- very large records --------------------------------------------------------------------
async def test_large_records_never_block_the_event_loop(pg_dsn: str, pg_schema: str) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = _big_entries(0, 120, None, 300_000)  # ~36 MB of COPY data
    ticker = _Ticker()
    cpu = wall = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        await trio.sleep(0.01)
        async with storage.append_stream() as stream:
            for first in range(0, 120, 4):
                stream.feed(entries[first : first + 4])
                await trio.lowlevel.checkpoint()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await stream.commit(StorageBatch(entries=entries))
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        nursery.cancel_scope.cancel()
    assert await _count(pg_dsn, pg_schema) == 120
    assert ticker.worst < 0.25, ticker.worst
    # commit waits for PostgreSQL on the socket: no busy loop burning our CPU meanwhile
    assert cpu < 0.5 * wall + 0.05, (cpu, wall)
    await storage.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 120


# -- cancellation everywhere ---------------------------------------------------------------
async def test_cancellation_at_every_moment_leaves_nothing_open(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    length, prev = 0, None
    outcomes = {"stored": 0, "not": 0}
    delays = [0, 0.0001, 0.0003, 0.001, 0.002, 0.003, 0.005, 0.008, 0.012, 0.02, 0.03, 0.05]
    for i, delay in enumerate(delays * 2):
        entries = (
            make_entries(LEDGER, length, 300, prev) if length else make_entries(LEDGER, 0, 300)
        )
        if i % 3 == 0:
            storage._stale = True  # enter through head()
        with trio.move_on_after(delay):
            async with storage.append_stream() as stream:
                for first in range(0, 300, 64):
                    stream.feed(entries[first : first + 64])
                    await trio.lowlevel.checkpoint()
                await stream.commit(StorageBatch(entries=entries, prev=prev))
        assert await _idle(storage), delay
        n = await _count(pg_dsn, pg_schema)
        assert n in (length, length + 300), (delay, n, length)
        assert (await storage.head())[0] == n
        if n != length:
            outcomes["stored"] += 1
            length, prev = n, entries[-1].hash
        else:
            outcomes["not"] += 1
        await storage.append(StorageBatch(entries=[], cursors={"m": min(i, length - 1)}))
    assert outcomes["not"] > 0
    await _stream(storage, make_entries(LEDGER, length, 10, prev), prev)
    await storage.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == length + 10


async def test_cancel_while_entering_waits_for_the_writer_connection(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 300)

    async def second() -> None:
        with trio.move_on_after(0.05):  # a second stream waits on the limiter: cancelled
            async with storage.append_stream():
                pytest.fail("the writer connection is the first stream's")

    async with storage.append_stream() as stream:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second)
        stream.feed(entries)
        await stream.commit(StorageBatch(entries=entries))
    assert storage._limiter.borrowed_tokens == 0
    assert await _count(pg_dsn, pg_schema) == 300
    await storage.close()


# -- many streams among plain and cursor-only appends -------------------------------------
async def test_many_streams_interleaved_with_plain_and_cursor_only_appends(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 40 * 30)
    done = trio.Event()
    cursor_batches = 0
    last_cursor = -1

    async def cursors() -> None:
        nonlocal cursor_batches, last_cursor
        while not done.is_set():
            cursor_batches += 1
            last_cursor = max(-1, storage._length - 1)
            await storage.append(StorageBatch(entries=[], cursors={"flusher": last_cursor}))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cursors)
        pos = 0
        for i in range(40):
            chunk = entries[pos : pos + 30]
            prev = entries[pos - 1].hash if pos else None
            if i % 4 == 3:
                await storage.append(StorageBatch(entries=chunk, prev=prev))
            elif i % 4 == 2:  # abandoned, then streamed again
                async with storage.append_stream() as stream:
                    stream.feed(chunk[:10])
                    await trio.lowlevel.checkpoint()
                await _stream(storage, chunk, prev, slice_=7)
            else:
                await _stream(storage, chunk, prev, slice_=7)
            pos += 30
        done.set()
    assert cursor_batches > 10
    assert await _count(pg_dsn, pg_schema) == 1200
    assert await _rows(pg_dsn, pg_schema, "SELECT seq FROM cursors") == [(last_cursor,)]
    assert await _idle(storage)
    await storage.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 1200


# -- the engine under load -----------------------------------------------------------------
async def test_engine_append_many_from_several_tasks(pg_dsn: str, pg_schema: str) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    seqs: list[int] = []
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=storage) as ledger:

        async def writer(t: int) -> None:
            for round_ in range(2):
                receipts = await ledger.append_many(
                    [Record("k", {"t": t, "r": round_, "n": n}) for n in range(1000)]
                )
                seqs.extend(r.seq for r in receipts)
                await ledger.append(Record("k", {"t": t, "single": round_}))

        async with trio.open_nursery() as nursery:
            for t in range(3):
                nursery.start_soon(writer, t)
        assert sorted(seqs) == sorted(set(seqs))
        assert len(seqs) == 6000
        assert await ledger.verify()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 6006


# -- a standby -----------------------------------------------------------------------------
async def test_a_standby_cannot_stream(pg_dsn: str, pg_schema: str) -> None:
    writer = await _writer(pg_dsn, pg_schema)
    await writer.append(StorageBatch(entries=make_entries(LEDGER, 0, 5)))
    standby = PostgresStorage(pg_dsn, schema=pg_schema, standby=True)
    await standby.open(LEDGER)
    with pytest.raises(Fenced, match=r"standby"):
        async with standby.append_stream():
            pytest.fail("a standby streamed")
    assert standby._limiter.borrowed_tokens == 0
    await standby.close()
    await writer.close()


# -- server settings -----------------------------------------------------------------------
async def test_the_tail_check_reads_bytea_whatever_bytea_output_is(
    pg_dsn: str, pg_schema: str
) -> None:
    """`bytea_output = 'escape'` (a database's or a role's default) must not matter: `append`
    reads the hash as bytes; the stream parses the text of the opening query's SELECT."""
    storage = await _writer(pg_dsn, pg_schema)
    try:
        entries = make_entries(LEDGER, 0, 400)
        await storage.append(StorageBatch(entries=entries[:100]))
        await trio.to_thread.run_sync(storage._conn.execute, "SET bytea_output = 'escape'")
        await storage.append(StorageBatch(entries=entries[100:110], prev=entries[99].hash))
        await _stream(storage, entries[110:], entries[109].hash)
        assert await _count(pg_dsn, pg_schema) == 400
    finally:
        await storage.close()


async def test_the_fence_matches_a_non_ascii_ledger_id_whatever_the_client_encoding(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq takes the client encoding from the environment (PGCLIENTENCODING) or the
    database's; psycopg encodes `append`'s parameters in it, so the stream's inlined SQL must
    be sent in it too: else its fence matches no lease row and a live writer is `Fenced`."""
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    ledger = "café"
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    await storage.open(ledger)
    try:
        entries = make_entries(ledger, 0, 400)
        await storage.append(StorageBatch(entries=entries[:100]))  # the plain fence matches
        await _stream(storage, entries[100:], entries[99].hash)
        assert storage.fenced is None
        assert await _count(pg_dsn, pg_schema) == 400
    finally:
        await storage.close()


async def test_engine_a_caller_cancelled_while_its_batch_streams(
    pg_dsn: str, pg_schema: str
) -> None:
    """A caller withdrawn at a checkpoint of the streamed encode: the stream is abandoned,
    the others' records are stored once, the chain verifies."""
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    kept: list[int] = []
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=storage) as ledger:
        await ledger.append(Record("k", {"first": True}))
        for delay in (0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016):

            async def victim() -> None:
                with trio.move_on_after(delay):  # noqa: B023
                    await ledger.append_many([Record("k", {"v": n}) for n in range(600)])

            async def other() -> None:
                receipts = await ledger.append_many([Record("k", {"o": n}) for n in range(600)])
                kept.extend(r.seq for r in receipts)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(victim)
                nursery.start_soon(other)
        assert len(kept) == len(set(kept)) == 600 * 7
        assert await ledger.verify()
        length = ledger.length if hasattr(ledger, "length") else None
    (count,) = (await _rows(pg_dsn, pg_schema, "SELECT count(*) FROM entries"))[0]
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == count
    assert length is None or length == count
    # every record the other caller was told is stored, is stored as its own
    rows = await _rows(
        pg_dsn,
        pg_schema,
        "SELECT seq FROM entries WHERE convert_from(canonical, 'UTF8') LIKE '%\"o\"%'",
    )
    assert len(rows) == len(kept)
    assert {r[0] for r in rows} == set(kept)


async def test_a_busy_default_thread_limiter_does_not_hold_the_transaction_open(
    pg_dsn: str, pg_schema: str
) -> None:
    """`append` runs its transaction on the connection's own limiter; the stream's tail and
    rollback hops go through trio's default thread limiter: when the application keeps it busy
    (blocking work in `to_thread`), the open transaction idles, holding the lease row, until
    the server kills the session (idle_in_transaction_session_timeout)."""
    storage = await _writer(pg_dsn, pg_schema, lease_timeout=1)  # idle timeout 500 ms
    entries = make_entries(LEDGER, 0, 300)
    default = trio.to_thread.current_default_thread_limiter()
    total = default.total_tokens
    default.total_tokens = 1
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, time.sleep, 0.8)  # app work
            await trio.sleep(0.05)
            # a plain append is not delayed by the application's threads
            await storage.append(StorageBatch(entries=entries[:10]))
            async with storage.append_stream() as stream:
                stream.feed(entries[10:])
                await stream.commit(StorageBatch(entries=entries[10:], prev=entries[9].hash))
        assert await _count(pg_dsn, pg_schema) == 300
    finally:
        default.total_tokens = total
        await storage.close()


async def test_backend_killed_during_commit_is_commit_unknown(pg_dsn: str, pg_schema: str) -> None:
    """A deferred constraint trigger makes COMMIT itself slow; the backend is killed during
    it: CommitUnknown (as `append` says), and the next write finds the truth."""
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 300)
    await _exec(
        pg_dsn,
        pg_schema,
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.seq = 299 THEN PERFORM pg_sleep(5); END IF; RETURN NULL; END $$",
        "CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON entries DEFERRABLE INITIALLY DEFERRED "
        "FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    )
    pid = storage._conn.pgconn.backend_pid

    async def kill_in_commit() -> None:
        while True:
            rows = await _rows(
                pg_dsn, pg_schema, f"SELECT query FROM pg_stat_activity WHERE pid = {pid}"
            )
            if rows and rows[0][0] == "COMMIT":
                break
            await trio.sleep(0.005)
        await trio.sleep(0.05)
        await trio.to_thread.run_sync(_kill_sync, pg_dsn, pid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_in_commit)
        with pytest.raises(CommitUnknown):
            await _stream(storage, entries, None)
    await _exec(pg_dsn, pg_schema, "DROP TRIGGER slow ON entries")
    assert await _count(pg_dsn, pg_schema) == 0
    assert await storage.head() == (0, genesis(LEDGER))
    await _stream(storage, entries, None)
    assert await _count(pg_dsn, pg_schema) == 300
    await storage.close()


async def test_a_backend_killed_while_idle_costs_one_write_at_most(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 600)
    await storage.append(StorageBatch(entries=entries[:100]))
    await _kill(pg_dsn, storage)  # psycopg does not know yet: the connection looks idle
    await trio.sleep(0.05)
    failure: StorageError | None = None
    try:
        await _stream(storage, entries[100:300], entries[99].hash)
    except StorageError as exc:
        failure = exc
    if failure is not None:
        assert not isinstance(failure, CommitUnknown)
        assert "nothing stored" in str(failure)
        await _stream(storage, entries[100:300], entries[99].hash)
    await _stream(storage, entries[300:], entries[299].hash)
    assert await _count(pg_dsn, pg_schema) == 600
    await storage.close()


async def test_engine_streams_alongside_the_cursor_flusher_and_small_appends(
    pg_dsn: str, pg_schema: str
) -> None:
    """Durable modules (their cursors flushed every 10 ms by the cursor flusher, a cursor-only
    batch under the pipeline's store lock), group commits that stream, small appends between."""
    from nucleus_actors import Module, ModuleSpec

    class Seen(Module):
        def __init__(self, module_id: str) -> None:
            self.id = module_id
            self.seqs: list[int] = []

        async def after_append(self, record: Record, hash: Hash) -> None:
            assert record.seq is not None
            self.seqs.append(record.seq)
            if record.seq % 97 == 0:
                await trio.sleep(0.001)

    one, two = Seen("one"), Seen("two")
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    total = 0
    async with open_ledger(
        LedgerConfig(ledger_id=LEDGER, cursor_interval=0.01),
        storage=storage,
        modules=[ModuleSpec(one, durable=True), ModuleSpec(two, durable=True)],
    ) as ledger:

        async def big(t: int) -> None:
            nonlocal total
            for r in range(3):
                got = await ledger.append_many(
                    [Record("k", {"t": t, "r": r, "n": n}) for n in range(400)]
                )
                total += len(got)
                await trio.sleep(0.005)

        async def small() -> None:
            nonlocal total
            for n in range(60):
                await ledger.append(Record("s", {"n": n}))
                total += 1
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(big, 0)
            nursery.start_soon(big, 1)
            nursery.start_soon(small)
        for _ in range(200):
            if len(one.seqs) == total and len(two.seqs) == total:
                break
            await trio.sleep(0.01)
        assert one.seqs == list(range(total)) == two.seqs
        assert await ledger.verify()
    assert total == 2460
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == total
    rows = await _rows(pg_dsn, pg_schema, "SELECT module, seq FROM cursors ORDER BY module")
    assert rows == [("one", total - 1), ("two", total - 1)]


async def test_engine_a_group_commit_append_stores_is_stored_when_streamed(
    pg_dsn: str, pg_schemas: Callable[[], str]
) -> None:
    """statement_timeout (lease/2) bounds one COPY statement. `append` opens its COPY once the
    batch is hashed; the stream opens it before hashing starts, so the timeout now bounds
    hashing + COPY: a group commit `append` stores within it fails when streamed."""
    n = 100_000
    outcomes: dict[str, str] = {}
    for streamed in (False, True):
        schema = pg_schemas()
        storage = PostgresStorage(pg_dsn, schema=schema, lease_timeout=1)
        if not streamed:
            storage.append_stream = None  # type: ignore[assignment,method-assign]
        async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=storage) as ledger:
            records = [Record("k", {"n": i, "pad": "x" * 20}) for i in range(n)]
            start = time.perf_counter()
            try:
                await ledger.append_many(records)
                outcomes[f"streamed={streamed}"] = f"stored in {time.perf_counter() - start:.2f}s"
            except StorageError as exc:
                outcomes[f"streamed={streamed}"] = (
                    f"{str(exc)[-160:]} after {time.perf_counter() - start:.2f}s"
                )
    assert outcomes["streamed=False"].startswith("stored"), outcomes
    assert outcomes["streamed=True"].startswith("stored"), outcomes


async def test_closing_the_storage_while_a_stream_is_open(pg_dsn: str, pg_schema: str) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    entries = make_entries(LEDGER, 0, 300)
    closed = trio.Event()

    async def close() -> None:
        await storage.close()
        closed.set()

    async with trio.open_nursery() as nursery, storage.append_stream() as stream:
        stream.feed(entries[:100])
        nursery.start_soon(close)
        await trio.sleep(0.05)
        assert not closed.is_set()  # close waits for the writer connection
        stream.feed(entries[100:])
        await stream.commit(StorageBatch(entries=entries))
    assert closed.is_set()
    assert await _count(pg_dsn, pg_schema) == 300
    lease = await _rows(pg_dsn, pg_schema, "SELECT expires_at < clock_timestamp() FROM lease")
    assert lease == [(True,)]  # released after the stream
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 300


async def test_engine_idempotent_retries_of_streamed_batches(pg_dsn: str, pg_schema: str) -> None:
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=storage) as ledger:
        records = [Record("k", {"n": n}) for n in range(500)]
        first = await ledger.append_many(records, idempotency_key="batch-1")
        again = await ledger.append_many(records, idempotency_key="batch-1")
        assert [r.seq for r in again] == [r.seq for r in first]
        other = await ledger.append_many(records, idempotency_key="batch-2")
        assert other[0].seq == 500
        assert await ledger.verify()
    reopened = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=reopened) as ledger:
        again = await ledger.append_many(records, idempotency_key="batch-2")
        assert [r.seq for r in again] == [r.seq for r in other]
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 1000


class _CancelAtStep(trio.abc.Instrument):
    """Cancels `scope` once `task` has run `step` steps (the cancellation lands at its next
    checkpoint): with step = 0, 1, 2, ... every checkpoint of a block gets its turn."""

    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope, step: int) -> None:
        self.task, self.scope, self.step, self.steps = task, scope, step, 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            if self.steps == self.step:
                self.scope.cancel()


@pytest.mark.parametrize("reconnect", [False, True], ids=["idle-conn", "reconnect"])
async def test_cancellation_at_each_checkpoint_in_turn(
    pg_dsn: str, pg_schema: str, reconnect: bool
) -> None:
    storage = await _writer(pg_dsn, pg_schema)
    length, prev = 0, None
    results = []
    for step in range(1, 200):
        entries = make_entries(LEDGER, length, 20, prev) if length else make_entries(LEDGER, 0, 20)
        if reconnect:
            async with storage._limiter:
                await trio.to_thread.run_sync(storage._conn.close)  # the next write reconnects
            storage._stale = True
        with trio.CancelScope() as scope:
            instrument = _CancelAtStep(trio.lowlevel.current_task(), scope, step)
            trio.lowlevel.add_instrument(instrument)
            try:
                async with storage.append_stream() as stream:
                    for first in range(0, 20, 7):
                        stream.feed(entries[first : first + 7])
                        await trio.lowlevel.checkpoint()
                    await stream.commit(StorageBatch(entries=entries, prev=prev))
            finally:
                trio.lowlevel.remove_instrument(instrument)
        assert await _idle(storage), step
        n = await _count(pg_dsn, pg_schema)
        assert n in (length, length + 20), (step, n, length)
        assert await storage.head() == (
            (n, entries[-1].hash) if n != length else (length, prev or genesis(LEDGER))
        )
        results.append(n != length)
        if n != length:
            length, prev = n, entries[-1].hash
        if not scope.cancelled_caught and instrument.steps < step:
            break  # the block ran to its end before this step: every checkpoint was hit
    assert not results[0]
    assert results[-1]
    assert storage._limiter.borrowed_tokens == 0
    await storage.append(StorageBatch(entries=make_entries(LEDGER, length, 5, prev), prev=prev))
    await storage.close()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == length + 5


async def test_the_lease_is_renewed_after_a_stream_lost_its_connection(
    pg_dsn: str, pg_schema: str
) -> None:
    storage = await _writer(pg_dsn, pg_schema, lease_timeout=0.9)
    entries = make_entries(LEDGER, 0, 300)
    async with storage.append_stream() as stream:
        stream.feed(entries[:100])
        await trio.sleep(0.02)
        await _kill(pg_dsn, storage)
        stream.feed(entries[100:])
        with pytest.raises(StorageError, match=r"nothing stored"):
            await stream.commit(StorageBatch(entries=entries))
    renewed = storage.renewed_at
    await trio.sleep(0.7)  # two renewal periods
    assert renewed is not None
    assert storage.renewed_at is not None
    assert storage.renewed_at > renewed
    assert storage.fenced is None
    assert (await storage.lease()).remaining > 0.3
    async with storage.append_stream() as stream:  # a cursor-only batch through a stream
        await stream.commit(StorageBatch(entries=[], cursors={"m": -1}))
    await _stream(storage, entries, None, cursors={"m": 299})
    assert await _rows(pg_dsn, pg_schema, "SELECT seq FROM cursors") == [(299,)]
    await storage.close()


async def test_engine_an_oversized_record_in_a_streamable_group(
    pg_dsn: str, pg_schema: str
) -> None:
    """A group of >= 256 records where one request carries a record over max_record_bytes:
    not streamed; that request fails, the others are stored."""
    storage = PostgresStorage(pg_dsn, schema=pg_schema, lease_timeout=30)
    config = LedgerConfig(ledger_id=LEDGER, max_record_bytes=4096)
    async with open_ledger(config, storage=storage) as ledger:
        await ledger.append(Record("k", {"n": -1}))
        outcome: dict[str, object] = {}

        async def good(name: str) -> None:
            outcome[name] = await ledger.append_many([Record("k", {"n": n}) for n in range(200)])

        async def bad() -> None:
            try:
                await ledger.append_many(
                    [Record("k", {"n": 0}), Record("k", {"blob": "x" * 10_000})]
                )
            except Exception as exc:
                outcome["bad"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(good, "a")
            nursery.start_soon(bad)
            nursery.start_soon(good, "b")
        assert isinstance(outcome["bad"], Exception)
        assert len(outcome["a"]) == len(outcome["b"]) == 200  # type: ignore[arg-type]
        assert await ledger.verify()
    assert (await verify_schema(pg_dsn, schema=pg_schema))[1] == 401
