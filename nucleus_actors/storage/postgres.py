"""`PostgresStorage`: a ledger in a PostgreSQL schema, with one fenced writer at a time.

Schema layout (format version 2), all tables in the storage's `schema`:

```
CREATE TABLE meta    (key text PRIMARY KEY, value text NOT NULL);
    -- format_version '2', ledger_id, hash_scheme, created_by
CREATE TABLE entries (seq bigint PRIMARY KEY, canonical bytea NOT NULL, hash bytea NOT NULL);
CREATE TABLE lease   (ledger_id text PRIMARY KEY, epoch bigint NOT NULL, holder text NOT NULL,
                      expires_at timestamptz NOT NULL, acquired_at timestamptz);
-- format 2 (migration from 1):
CREATE TABLE cursors     (module text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE tree_tiles  (level int, idx bigint, hashes bytea NOT NULL, PRIMARY KEY (level, idx));
CREATE TABLE idempotency (key text PRIMARY KEY, fingerprint text NOT NULL, first_seq bigint
                          NOT NULL, count bigint NOT NULL, created bigint NOT NULL);
CREATE INDEX idempotency_created ON idempotency (created);
```

Migrations run in one transaction per step under a transaction-level advisory lock keyed by
the schema name, so two processes opening the same schema at once never both migrate it.

Fencing (the lease): the `lease` row of the ledger holds the current *epoch* (the fencing
token) and an expiry judged by PostgreSQL's clock. A writer takes the lease at `open` when it
is free or expired (epoch + 1, under `lock_timeout`), renews it every `lease_timeout / 3` (a
trio system task) and with every batch. Every write transaction starts with
`UPDATE lease ... WHERE epoch = <mine> RETURNING`: that row lock both checks and holds the
fence until the transaction ends, and a writer whose epoch is no longer current gets `Fenced`
with nothing committed. Writer sessions set `idle_in_transaction_session_timeout` and
`statement_timeout` below the lease, so a writer frozen inside a transaction (SIGSTOP, a GC
pause) is cut off by the server and cannot hold the lease row past its expiry.

Threading: psycopg's blocking driver in `trio.to_thread.run_sync`, one `CapacityLimiter(1)`
per connection: the writer connection (batches, lease, migrations) and a read connection
(autocommit; range reads in bounded chunks, capability reads, a standby's head). One batch is
one transaction in one thread hop; hops are never abandoned on cancellation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import re
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, TypeVar

import trio

from ..errors import CommitUnknown, Fenced, IntegrityError, StorageError
from ..hashing import genesis
from ..record import Entry, Hash
from ._base import (
    STORAGE_CONTRACT,
    AppendStream,
    IdempotencyRecord,
    StorageBatch,
    TreeTile,
    batch_rows,
    check_batch,
    check_range,
    check_tail,
    decode_tiles,
)
from .sqlite import HASH_SCHEME, _created_by, _Entries, _entry, _verify_chain

if TYPE_CHECKING:
    import psycopg

__all__ = ["LeaseInfo", "PostgresStorage", "verify_schema"]

log = logging.getLogger("nucleus_actors.storage.postgres")

_T = TypeVar("_T")
_Row = tuple[Any, Any, Any]

_CHUNK_ROWS: Final = 512
_CHUNK_BYTES: Final = 4 * 1024 * 1024
_SCHEMA_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOCK_NAMESPACE: Final = "nucleus_actors:"

_SCHEMA_1: Final = (
    "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
    "CREATE TABLE entries (seq bigint PRIMARY KEY, canonical bytea NOT NULL, hash bytea NOT NULL)",
    "CREATE TABLE lease (ledger_id text PRIMARY KEY, epoch bigint NOT NULL, holder text NOT NULL, "
    "expires_at timestamptz NOT NULL, acquired_at timestamptz)",
)


def _to_2(cur: psycopg.Cursor[Any]) -> None:
    cur.execute("CREATE TABLE cursors (module text PRIMARY KEY, seq bigint NOT NULL)")
    cur.execute(
        "CREATE TABLE tree_tiles (level integer NOT NULL, idx bigint NOT NULL, "
        "hashes bytea NOT NULL, PRIMARY KEY (level, idx))"
    )
    cur.execute(
        "CREATE TABLE idempotency (key text PRIMARY KEY, fingerprint text NOT NULL, "
        "first_seq bigint NOT NULL, count bigint NOT NULL, created bigint NOT NULL)"
    )
    cur.execute("CREATE INDEX idempotency_created ON idempotency (created)")


@dataclass(frozen=True, slots=True)
class _Migration:
    version: int
    what: str
    apply: Callable[[psycopg.Cursor[Any]], None]


_MIGRATIONS: Final[tuple[_Migration, ...]] = (
    _Migration(2, "add tables cursors, tree_tiles and idempotency (storage contract v2)", _to_2),
)
FORMAT_VERSION: Final = 1 + len(_MIGRATIONS)

_UPSERT_CURSOR: Final = (
    "INSERT INTO cursors (module, seq) VALUES (%s, %s) "
    "ON CONFLICT (module) DO UPDATE SET seq = excluded.seq"
)
_UPSERT_TILE: Final = (
    "INSERT INTO tree_tiles (level, idx, hashes) VALUES (%s, %s, %s) "
    "ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes "
    "WHERE length(excluded.hashes) >= length(tree_tiles.hashes)"
)
_UPSERT_KEY: Final = (
    "INSERT INTO idempotency (key, fingerprint, first_seq, count, created) "
    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET "
    "fingerprint = excluded.fingerprint, first_seq = excluded.first_seq, "
    "count = excluded.count, created = excluded.created"
)
_SELECT: Final = (
    "SELECT seq, canonical, hash FROM entries WHERE seq >= %s AND seq < %s ORDER BY seq LIMIT %s"
)
_LAST: Final = "SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"
# The same in text form whatever `bytea_output` is (the stream reads it as a simple query).
_LAST_HEX: Final = "SELECT seq, encode(hash, 'hex') FROM entries ORDER BY seq DESC LIMIT 1"
# The fence: renews the lease and locks its row until the transaction ends.
_FENCE: Final = (
    "UPDATE lease SET expires_at = clock_timestamp() + make_interval(secs => %s) "
    "WHERE ledger_id = %s AND epoch = %s AND holder = %s RETURNING epoch"
)
_LEASE: Final = (
    "SELECT epoch, holder, extract(epoch FROM expires_at - clock_timestamp())::float8 "
    "FROM lease WHERE ledger_id = %s"
)


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaseInfo:
    """The lease of a ledger as PostgreSQL sees it now (`PostgresStorage.lease`)."""

    epoch: int
    """The current fencing epoch (0: no writer ever held it)."""
    holder: str
    """Who holds (or last held) it: `host:pid:id` of a `PostgresStorage`, or empty."""
    remaining: float
    """Seconds until it expires by PostgreSQL's clock (<= 0: expired, free to take)."""


class _Fence(Exception):
    """Raised inside a write transaction whose epoch is not current (becomes `Fenced`)."""

    def __init__(self, current: int | None, holder: str | None) -> None:
        super().__init__(current, holder)
        self.current = current
        self.holder = holder


_COPY: Final = "COPY entries (seq, canonical, hash) FROM STDIN (FORMAT BINARY)"


def _upsert_parts(
    cur: Any,
    cursors: list[tuple[str, int]],
    tiles: list[tuple[int, int, bytes]],
    keys: list[tuple[str, str, int, int, int]],
) -> None:
    """A batch's cursors, tiles and idempotency keys, in the write transaction."""
    if cursors:
        cur.executemany(_UPSERT_CURSOR, cursors)
    if tiles:
        cur.executemany(_UPSERT_TILE, tiles)
    if keys:
        cur.executemany(_UPSERT_KEY, keys)


class _Moved(Exception):
    """The stored last entry (`found`) is not the one this writer committed (`tail`)."""

    def __init__(self, found: tuple[int, bytes] | None, tail: tuple[int, bytes] | None) -> None:
        super().__init__(
            f"the stored last entry is {found!r}, this writer committed {tail!r}: has another "
            "writer written to the schema?"
        )


_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_COPY_TRAILER: Final = b"\xff\xff"
_ROW_HEAD: Final = struct.Struct(">hiqi")  # 3 fields; int8 seq (8 bytes); canonical's length
_HASH_FIELD: Final = struct.pack(">i", 32)


def _copy_rows(entries: Sequence[Entry]) -> bytes:
    """`entries` as binary COPY tuples of `(seq, canonical, hash)` (no header)."""
    pack = _ROW_HEAD.pack
    return b"".join(
        [
            b"%s%s%s%s" % (pack(3, 8, e.seq, len(e.canonical)), e.canonical, _HASH_FIELD, e.hash)
            for e in entries
        ]
    )


class _FenceLost(Exception):
    """The stream's fence matched no lease row: another writer's epoch (details fetched on
    the error path)."""


class _Stream:
    """One `PostgresStorage.append_stream` block, driven from the event loop.

    The whole transaction runs on the writer connection in libpq's non-blocking mode, waiting
    on its socket with trio: no worker thread while the caller hashes, so no GIL hand-off (a
    worker thread wanting the GIL back from a busy event loop waits up to the switch
    interval). One simple query opens it: BEGIN, the fence, the tail check, `COPY ... FROM
    STDIN`; its answers are read whenever `feed` runs. Each fed slice is sent at once, so
    PostgreSQL inserts rows while the next slice is hashed. `commit` ends the COPY, waits for
    PostgreSQL's answer on the socket, then a worker thread (the event loop is idle by then)
    writes the other parts and commits. Leaving the block without `commit` aborts the COPY and
    rolls back.
    """

    def __init__(
        self,
        storage: PostgresStorage,
        conn: Any,
        epoch: int,
        expected: int,
        head: Hash,
        release: Callable[[], None],
    ) -> None:
        self._storage = storage
        self._release: Callable[[], None] | None = release  # the limiter: freed once done
        self._conn = conn
        self._pgconn = conn.pgconn
        self._epoch = epoch
        self._expected = expected
        self._head = head
        self._fed: list[Entry] = []
        self._pending = bytearray(_COPY_HEADER)  # COPY data not handed to libpq yet
        self._answers = 0  # answers of the opening query read so far
        self._fenced_ok = False
        self._copying = False  # COPY IN in progress on the connection
        self._open = False  # a transaction (or its opening query) is on the connection
        self._closed = False
        self._error: Exception | None = None
        self._committing = {"committing": False}

    def begin(self) -> None:
        """Send the opening query (no wait)."""
        self._open = True
        try:
            opening = self._storage._opening(self._epoch, self._conn.info.encoding)
            self._pgconn.send_query(opening)
        except Exception as exc:
            self._error = exc
        self._advance()

    def feed(self, entries: Sequence[Entry]) -> None:
        """Hand the next entries of the batch, in order (sent at once when the COPY runs)."""
        if self._closed:
            raise StorageError("append_stream: feed after commit or after the block ended")
        if not entries:
            return
        self._fed.extend(entries)
        self._pending += _copy_rows(entries)
        self._advance()

    def _advance(self) -> None:
        """`_pump` unless something failed already; a failure is kept for `commit` to raise
        (the block's end rolls back)."""
        if self._error is None:
            try:
                self._pump()
            except Exception as exc:
                self._error = exc

    def _pump(self) -> bool:
        """Move the transaction on without waiting: send what is pending, read the opening
        query's answers that arrived. True while it waits for more of them."""
        pgconn = self._pgconn
        if pgconn.flush() < 0:
            raise _connection_error(self._storage, "could not send to PostgreSQL", pgconn)
        while not self._copying:
            pgconn.consume_input()
            if pgconn.is_busy():
                return True
            result = pgconn.get_result()
            if result is None:
                raise StorageError(
                    f"{self._storage._where()}: append failed, nothing stored: the COPY did "
                    "not start"
                )
            self._answer(result)
        if self._pending:
            if pgconn.put_copy_data(bytes(self._pending)) != 1:
                raise _connection_error(self._storage, "COPY data refused", pgconn)
            self._pending.clear()
            if pgconn.flush() < 0:
                raise _connection_error(self._storage, "could not send COPY data", pgconn)
        return False

    def _answer(self, result: Any) -> None:
        """One answer of the opening query: BEGIN, the fence, the tail, the COPY."""
        psycopg = _psycopg()
        status = psycopg.pq.ExecStatus
        step = self._answers
        self._answers += 1
        if result.status == status.COPY_IN:
            self._copying = True
            if not self._fenced_ok:
                raise _FenceLost
            return
        if result.status not in (status.COMMAND_OK, status.TUPLES_OK):
            raise psycopg.errors.error_from_result(result, encoding=self._conn.info.encoding)
        if step == 1:  # UPDATE lease ... RETURNING epoch
            self._fenced_ok = result.ntuples == 1
        elif step == 2 and self._fenced_ok:  # the stored last entry
            found = None
            if result.ntuples:
                seq, hash_text = result.get_value(0, 0), result.get_value(0, 1)
                found = (int(seq), bytes.fromhex(bytes(hash_text).decode("ascii")))
            tail = self._storage._tail(self._expected)
            if found != tail:
                raise _Moved(found, tail)

    async def commit(self, batch: StorageBatch) -> None:
        """Commit `batch`, whose entries are exactly those fed, in order (else nothing is
        stored and StorageError); raises what `append` raises."""
        storage = self._storage
        if self._closed:
            raise StorageError("append_stream: commit after commit or after the block ended")
        fed = self._fed
        after = check_batch(batch, self._expected, self._head, backend=storage)
        if len(fed) != len(batch.entries) or any(map(operator.is_not, fed, batch.entries)):
            raise StorageError(
                f"append_stream: the batch's {len(batch.entries)} entries are not the "
                f"{len(fed)} fed, in order (nothing stored)"
            )
        self._closed = True
        with trio.CancelScope(shield=True):  # the transaction runs: learn its outcome
            try:
                while self._error is None and self._pump():
                    await trio.lowlevel.wait_readable(self._pgconn.socket)
                if self._error is not None:
                    raise self._error
                await self._end_copy(None)
                parts = batch_rows(batch, entries=False)[1:]
                self._open = False  # the thread commits or rolls back
                await trio.to_thread.run_sync(
                    storage._stream_commit, self._conn, *parts, self._committing,
                    limiter=storage._stream_hops,
                )  # fmt: skip
            except Exception as exc:
                await self._rollback()
                if isinstance(exc, _FenceLost):
                    exc = await storage._lost_fence(self._conn)
                self._ended()
                storage._raise_append_error(exc, self._committing["committing"])
            self._ended()
        storage._appended(batch, after)

    def _ended(self) -> None:
        """The transaction is over: the writer connection is free again (once)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    async def _end_copy(self, error: bytes | None) -> None:
        """End the COPY (`error`: abort it) and read the answers to the end, waiting on the
        socket; raises a psycopg error if PostgreSQL refused the rows."""
        self._copying = False
        pgconn = self._pgconn
        if error is None:
            self._pending += _COPY_TRAILER
            if pgconn.put_copy_data(bytes(self._pending)) != 1:
                raise _connection_error(self._storage, "COPY data refused", pgconn)
            self._pending.clear()
        while (ended := pgconn.put_copy_end(error)) == 0:
            await trio.lowlevel.wait_writable(pgconn.socket)
        if ended < 0:
            raise _connection_error(self._storage, "could not end the COPY", pgconn)
        failure = await self._drain()
        if failure is not None and error is None:
            raise failure

    async def _drain(self) -> Exception | None:
        """Read the answers of the command in progress to the end (waiting on the socket);
        the first error among them."""
        psycopg = _psycopg()
        ok = (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK)
        pgconn = self._pgconn
        while (flushed := pgconn.flush()) == 1:
            await trio.lowlevel.wait_writable(pgconn.socket)
        if flushed < 0:
            raise _connection_error(self._storage, "could not send to PostgreSQL", pgconn)
        failure: Exception | None = None
        while True:
            pgconn.consume_input()
            if pgconn.is_busy():
                await trio.lowlevel.wait_readable(pgconn.socket)
                continue
            result = pgconn.get_result()
            if result is None:
                return failure
            if result.status == psycopg.pq.ExecStatus.COPY_IN:  # the opening query's COPY
                self._copying = True
                pgconn.put_copy_end(b"append_stream: the batch was abandoned")
            elif result.status not in ok and failure is None:
                failure = psycopg.errors.error_from_result(
                    result, encoding=self._conn.info.encoding
                )

    async def _rollback(self) -> None:
        """Abort the COPY or read the opening query's answers to the end, then roll back;
        a connection that cannot is closed (and replaced before the next write)."""
        if not self._open:
            return
        self._open = False
        try:
            if self._copying:
                await self._end_copy(b"append_stream: the batch was abandoned")
            else:
                await self._drain()
        except Exception:
            log.warning("could not end an abandoned append; reconnecting", exc_info=True)
            with contextlib.suppress(Exception):
                self._conn.close()
            return
        storage = self._storage
        await trio.to_thread.run_sync(
            storage._stream_rollback, self._conn, limiter=storage._stream_hops
        )

    async def close(self) -> None:
        """Roll back unless committed (the block's end)."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                await self._rollback()
            finally:
                self._ended()


def _connection_error(storage: PostgresStorage, what: str, pgconn: Any) -> StorageError:
    return StorageError(
        f"{storage._where()}: append failed, nothing stored: {what} ({_message(pgconn)})"
    )


def _message(pgconn: Any) -> str:
    return bytes(pgconn.error_message or b"").decode("utf-8", "replace").strip() or "no detail"


def _psycopg_sql() -> Any:
    from psycopg import sql

    return sql


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise StorageError(
            "PostgresStorage needs psycopg 3: pip install 'nucleus_actors[postgres]'"
        ) from exc
    return psycopg


def redact(dsn: str | None) -> str:
    """`dsn` with any password hidden (for messages); `"(PG* environment)"` for None."""
    if dsn is None or dsn == "":
        return "(libpq defaults and PG* environment variables)"
    psycopg = _psycopg()
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return "(an unparsable connection string)"
    if "password" in params:
        params["password"] = "***"
    shown = " ".join(f"{key}={value}" for key, value in params.items() if key != "options")
    return shown or "(libpq defaults)"


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class PostgresStorage:
    """A ledger in one PostgreSQL schema, written by one fenced writer at a time.

    `open` connects, creates the schema (or migrates an older one, under an advisory lock),
    checks it belongs to the ledger, and (unless `standby`) takes the ledger's lease: a new
    fencing epoch. Each `append` batch is one transaction that first checks, under the lease
    row's lock, that this storage's epoch is still current (else `Fenced`, nothing stored),
    then writes entries with binary `COPY` and cursors, tiles and keys with batched upserts.
    See docs/storage.md, "PostgreSQL".

    Args:
        dsn: a libpq connection string or URI (`postgresql://user@host/db`); None or `""`:
            libpq defaults and the standard `PG*` environment variables (`PGHOST`,
            `PGPASSWORD`, `PGPASSFILE`, ...), which keep secrets out of configuration files.
        schema: the schema holding this ledger's tables (one ledger per schema); created if
            missing.
        lease_timeout: seconds a writer's lease lasts without renewal (PostgreSQL's clock).
            A writer renews every `lease_timeout / 3`; a standby can take over once it expired.
        standby: open without taking the lease: reads only, `head` follows the database,
            `append` raises `Fenced`. `acquire()` later turns it into the writer.
        connect_timeout: seconds to wait for a connection (libpq `connect_timeout`, and
            `tcp_user_timeout` for a peer that stops answering).

    Raises:
        TypeError, ValueError: a bad argument (naming it and the value).
    """

    FORMAT_VERSION: Final = FORMAT_VERSION
    """The schema format version this build writes (it migrates every earlier one)."""

    storage_contract: ClassVar[int] = STORAGE_CONTRACT
    """Storage contract v2; every capability is implemented."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = "nucleus",
        lease_timeout: float = 5.0,
        standby: bool = False,
        connect_timeout: float = 5.0,
    ) -> None:
        if dsn is not None and not isinstance(dsn, str):
            raise TypeError(f"PostgresStorage dsn must be a str or None, got {dsn!r}")
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ValueError(
                "PostgresStorage schema must be an identifier of 1 to 63 ASCII letters, digits "
                f"and underscores, not starting with a digit, got {schema!r}"
            )
        for name, value, low in (
            ("lease_timeout", lease_timeout, 0.3),
            ("connect_timeout", connect_timeout, 0.1),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < low
            ):
                raise ValueError(f"PostgresStorage {name} must be a number >= {low}, got {value!r}")
        self.dsn: Final = dsn or None
        """The connection string (None: libpq defaults and `PG*` variables)."""
        self.schema: Final = schema
        """The schema holding the ledger's tables."""
        self.lease_timeout: Final = float(lease_timeout)
        """Seconds a lease lasts without renewal."""
        self.connect_timeout: Final = float(connect_timeout)
        """Seconds to wait for a connection."""
        self.holder: Final = _holder()
        """This storage's name in the lease table (`host:pid:random`)."""
        self._standby = bool(standby)
        self._limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)
        self._conn: Any = None
        self._opening_sql: tuple[tuple[int, str], bytes] | None = None  # append_stream's
        # The stream's own thread hops (never behind the application's threads on trio's
        # default limiter while its transaction is open).
        self._stream_hops = trio.CapacityLimiter(1)
        self._reader: Any = None
        self._ledger_id: str | None = None
        self._open = False
        self._epoch: int | None = None
        self._length = 0
        self._head: Hash | None = None
        self._stale = False
        self._fenced: Fenced | None = None
        self._renewer: trio.CancelScope | None = None
        self._lost = trio.Event()
        self.renewed_at: float | None = None
        """`time.monotonic()` of the last successful renewal (or acquisition)."""

    def __repr__(self) -> str:
        role = "standby" if self._epoch is None else f"writer epoch {self._epoch}"
        state = f"open, {role}" if self._open else "closed"
        return f"<PostgresStorage {redact(self.dsn)} schema={self.schema} {state}>"

    # -- properties ------------------------------------------------------------------------
    @property
    def epoch(self) -> int | None:
        """The fencing epoch this storage writes under; None on a standby (or when closed)."""
        return self._epoch

    @property
    def fenced(self) -> Fenced | None:
        """Why this writer lost its lease (a renewal or a batch found a newer epoch), or None."""
        return self._fenced

    async def wait_lost(self) -> Fenced:
        """Wait until this writer learns it lost its lease; return the `Fenced` error.

        Cancellation: nothing to undo (only waits).
        """
        await self._lost.wait()
        assert self._fenced is not None
        return self._fenced

    # -- connections -----------------------------------------------------------------------
    def _where(self) -> str:
        return f"PostgreSQL {redact(self.dsn)} schema {self.schema!r}"

    def _connect(self, *, writer: bool) -> Any:
        """A new connection, search_path on the schema; writer sessions bounded below the
        lease (statement and idle-in-transaction timeouts)."""
        psycopg = _psycopg()
        ms = int(self.lease_timeout * 1000)
        options = [f"-c search_path={self.schema}"]
        if writer:
            options += [
                f"-c statement_timeout={max(100, ms // 2)}",
                f"-c idle_in_transaction_session_timeout={max(100, ms // 2)}",
                f"-c lock_timeout={max(100, ms // 3)}",
            ]
        try:
            conn = psycopg.connect(
                self.dsn or "",
                autocommit=True,
                connect_timeout=max(1, math.ceil(self.connect_timeout)),
                options=" ".join(options),
                tcp_user_timeout=int(max(self.connect_timeout, self.lease_timeout) * 1000),
                keepalives=1,
                keepalives_idle=max(1, int(self.lease_timeout)),
                keepalives_interval=1,
                keepalives_count=3,
                application_name=f"nucleus_actors {self.holder}"[:63],
            )
        except psycopg.ProgrammingError as exc:
            raise StorageError(
                f"PostgresStorage: bad connection string {redact(self.dsn)}: {exc}"
            ) from exc
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot connect to PostgreSQL {redact(self.dsn)}: {_reason(exc)}"
            ) from exc
        return conn

    async def _hop(self, what: str, fn: Callable[..., _T], *args: Any, reader: bool = False) -> _T:
        """`fn(*args)` in a worker thread under one connection's limiter; psycopg errors ->
        StorageError naming the server, the schema and what failed."""
        psycopg = _psycopg()
        limiter = self._read_limiter if reader else self._limiter
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except psycopg.Error as exc:
            raise StorageError(f"{self._where()}: {what} failed: {_reason(exc)}") from exc

    def _writer(self, opening: bool = False) -> Any:
        """The writer connection, reconnected if the last one broke (worker thread)."""
        if not (self._open or opening):
            raise StorageError(f"PostgresStorage ({self._where()}) was closed")
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._conn = conn = self._connect(writer=True)
        return conn

    def _reading_conn(self, opening: bool = False) -> Any:
        if not (self._open or opening):
            raise StorageError(f"PostgresStorage ({self._where()}) was closed")
        conn = self._reader
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._reader = conn = self._connect(writer=False)
        return conn

    def _require_open(self, what: str) -> None:
        if not self._open:
            raise StorageError(f"cannot {what}: PostgresStorage ({self._where()}) is not open")

    # -- open ------------------------------------------------------------------------------
    async def open(self, ledger_id: str) -> None:
        """Connect, create or migrate the schema, check it belongs to `ledger_id`, take the
        lease (a writer) and check the last entry's chain hash.

        Cancellation: once the worker thread runs, the open completes (or fails, leaving
        nothing held) before the cancellation is delivered.

        Raises:
            StorageError: already open; cannot connect (bad DSN, wrong password, missing
                database: the message says which); the schema belongs to another ledger,
                has an unknown or newer format. Fenced: (writer) another writer holds a lease
                that has not expired (its epoch in `current`).
            IntegrityError: the last entry does not verify.
        """
        if self._open:
            raise StorageError(
                f"PostgresStorage ({self._where()}) is already open (ledger {self._ledger_id!r})"
            )
        if not isinstance(ledger_id, str) or not ledger_id:
            raise StorageError(f"ledger id must be a non-empty str, got {ledger_id!r}")
        self._fenced = None
        self._lost = trio.Event()
        try:
            length, head = await self._hop("open", self._open_sync, ledger_id)
        except BaseException:
            await self._drop_connections()
            raise
        self._ledger_id = ledger_id
        self._length, self._head = length, head
        self._stale = False
        self._open = True
        if self._epoch is not None:
            self._start_renewing()

    def _open_sync(self, ledger_id: str) -> tuple[int, Hash]:
        conn = self._writer(opening=True)
        self._migrate_sync(conn, ledger_id)
        self._epoch = None
        if not self._standby:
            self._epoch = self._acquire_sync(conn, ledger_id)
        try:
            length, head = _check_tail(conn, ledger_id)
            self._reading_conn(opening=True)
        except BaseException:
            if self._epoch is not None:
                with contextlib.suppress(Exception):
                    conn.execute(
                        "UPDATE lease SET expires_at = 'epoch' WHERE ledger_id = %s "
                        "AND epoch = %s AND holder = %s",
                        (ledger_id, self._epoch, self.holder),
                    )
                self._epoch = None
            raise
        return length, head

    def _migrate_sync(self, conn: Any, ledger_id: str) -> None:
        """Create the schema at the current format, or migrate it, or check it (all under the
        schema's advisory lock, one transaction per step)."""
        psycopg = _psycopg()
        sql = psycopg.sql
        while True:
            with conn.transaction():
                cur = conn.cursor()
                cur.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (_LOCK_NAMESPACE + self.schema,),
                )
                cur.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
                cur.execute("SELECT to_regclass(%s)", (f"{self.schema}.meta",))
                row = cur.fetchone()
                if row is None or row[0] is None:
                    cur.execute("SELECT to_regclass(%s)", (f"{self.schema}.entries",))
                    found = cur.fetchone()
                    if found is not None and found[0] is not None:
                        raise StorageError(
                            f"{self._where()} has an 'entries' table but no 'meta' table: it "
                            "is not a nucleus_actors ledger schema"
                        )
                    for statement in _SCHEMA_1:
                        cur.execute(statement)
                    for step in _MIGRATIONS:
                        step.apply(cur)
                    cur.executemany(
                        "INSERT INTO meta (key, value) VALUES (%s, %s)",
                        [
                            ("format_version", str(FORMAT_VERSION)),
                            ("ledger_id", ledger_id),
                            ("hash_scheme", HASH_SCHEME),
                            ("created_by", _created_by()),
                        ],
                    )
                    log.info("%s: created for ledger %r", self._where(), ledger_id)
                    return
                meta = {str(k): str(v) for k, v in cur.execute("SELECT key, value FROM meta")}
                version = self._check_meta(meta, ledger_id)
                if version == FORMAT_VERSION:
                    return
                step = next(s for s in _MIGRATIONS if s.version == version + 1)
                log.info(
                    "%s: migrating format %d -> %d: %s",
                    self._where(), version, step.version, step.what,
                )  # fmt: skip
                step.apply(cur)
                cur.executemany(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [("format_version", str(step.version)), ("migrated_by", _created_by())],
                )
            # committed one step: loop for the next (a crash leaves the last completed step)

    def _check_meta(self, meta: dict[str, str], ledger_id: str) -> int:
        raw = meta.get("format_version")
        version = int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None
        if version is None or version < 1:
            raise StorageError(
                f"{self._where()} has format version {raw!r}, which no release of "
                f"nucleus_actors wrote; this build reads format versions 1 to {FORMAT_VERSION}"
            )
        if version > FORMAT_VERSION:
            raise StorageError(
                f"{self._where()} has format version {version}, newer than this build of "
                f"nucleus_actors reads (1 to {FORMAT_VERSION}); upgrade nucleus_actors"
            )
        if meta.get("hash_scheme") != HASH_SCHEME:
            raise StorageError(
                f"{self._where()} uses hash scheme {meta.get('hash_scheme')!r}; this build "
                f"computes {HASH_SCHEME!r}"
            )
        if meta.get("ledger_id") != ledger_id:
            raise StorageError(
                f"{self._where()} belongs to ledger {meta.get('ledger_id')!r}, cannot open it "
                f"as ledger {ledger_id!r} (one ledger per schema: set another schema)"
            )
        return version

    def _acquire_sync(self, conn: Any, ledger_id: str) -> int:
        """Take the lease if it is free or expired: the new epoch. Fenced if it is held."""
        psycopg = _psycopg()
        try:
            with conn.transaction():
                cur = conn.cursor()
                cur.execute(
                    "INSERT INTO lease (ledger_id, epoch, holder, expires_at) "
                    "VALUES (%s, 0, '', 'epoch') ON CONFLICT (ledger_id) DO NOTHING",
                    (ledger_id,),
                )
                cur.execute(_LEASE + " FOR UPDATE", (ledger_id,))
                row = cur.fetchone()
                assert row is not None
                epoch, holder, remaining = int(row[0]), str(row[1]), float(row[2])
                if remaining > 0:
                    raise Fenced(
                        f"ledger {ledger_id!r} in {self._where()} has a writer: {holder} holds "
                        f"its lease at epoch {epoch} for another {remaining:.1f} s (one writer "
                        "per ledger; a standby takes over once the lease expires)",
                        current=epoch,
                    )
                cur.execute(
                    "UPDATE lease SET epoch = epoch + 1, holder = %s, acquired_at = "
                    "clock_timestamp(), expires_at = clock_timestamp() + make_interval(secs => %s)"
                    " WHERE ledger_id = %s RETURNING epoch",
                    (self.holder, self.lease_timeout, ledger_id),
                )
                new = cur.fetchone()
                assert new is not None
        except psycopg.errors.LockNotAvailable as exc:
            stuck = self._end_stuck_writer(conn, ledger_id)
            raise Fenced(
                f"ledger {ledger_id!r} in {self._where()}: its lease row is locked by a writer's "
                + (
                    f"transaction although its lease expired: ended {stuck}'s sessions, the "
                    "next attempt takes over"
                    if stuck
                    else "transaction in progress (the lease is in use)"
                )
            ) from exc
        self.renewed_at = time.monotonic()
        log.info(
            "ledger %r: %s took the lease at epoch %d (was %d, held by %r)",
            ledger_id, self.holder, new[0], epoch, holder,
        )  # fmt: skip
        return int(new[0])

    def _end_stuck_writer(self, conn: Any, ledger_id: str) -> str | None:
        """After a lock timeout on the lease row: if the lease has expired by PostgreSQL's
        clock, its holder's transaction is stuck (a writer frozen while PostgreSQL waits for
        its client inside `COPY FROM STDIN`: neither `statement_timeout` nor
        `idle_in_transaction_session_timeout` ends that). Terminate the holder's sessions whose
        transaction is older than a write's `statement_timeout` (its lease is over: whatever it
        had not committed is rolled back) and return the holder; None when the lease is still
        valid, no transaction is that old (a renewal in flight), or nothing could be done
        (logged)."""
        psycopg = _psycopg()
        try:
            row = conn.execute(
                "SELECT holder, extract(epoch FROM expires_at - clock_timestamp())::float8 "
                "FROM lease WHERE ledger_id = %s",
                (ledger_id,),
            ).fetchone()
            if row is None or float(row[1]) > 0 or not row[0] or row[0] == self.holder:
                return None
            holder = str(row[0])
            # Only transactions older than a write's statement_timeout: a healthy one (a late
            # renewal of the lease in flight) commits or fails well within it.
            ended = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = left(%s, 63) AND pid <> pg_backend_pid() "
                "AND xact_start < clock_timestamp() - make_interval(secs => %s)",
                (f"nucleus_actors {holder}", self.lease_timeout / 2),
            ).fetchone()
            if not ended or not ended[0]:
                return None
        except psycopg.Error as exc:
            log.warning(
                "ledger %r: the expired lease's holder still locks its row, and its sessions "
                "could not be ended (the role needs pg_signal_backend or to be the same role): "
                "%s",
                ledger_id, _reason(exc),
            )  # fmt: skip
            return None
        log.warning(
            "ledger %r: %s's lease expired but its transaction still locks the lease row; "
            "ended %d of its sessions",
            ledger_id, holder, int(ended[0]) if ended else 0,
        )  # fmt: skip
        return holder

    async def lease(self) -> LeaseInfo:
        """The ledger's lease as PostgreSQL sees it now (read connection).

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or PostgreSQL failed.
        """
        self._require_open("read the lease")
        ledger_id = self._ledger_id

        def load() -> LeaseInfo:
            row = self._reading_conn().execute(_LEASE, (ledger_id,)).fetchone()
            if row is None:
                return LeaseInfo(epoch=0, holder="", remaining=-math.inf)
            return LeaseInfo(epoch=int(row[0]), holder=str(row[1]), remaining=float(row[2]))

        return await self._hop("read the lease", load, reader=True)

    async def acquire(self) -> int:
        """Turn this open standby into the writer if the lease is free or expired; the new
        epoch. The head is re-read from the database.

        Cancellation: once the worker thread runs, the attempt completes first.

        Raises:
            Fenced: another writer holds a valid lease (or is inside a transaction).
            StorageError: not open, already the writer, or PostgreSQL failed.
        """
        self._require_open("take the lease")
        if self._epoch is not None:
            raise StorageError(f"{self._where()}: this storage already holds the lease")
        ledger_id = self._ledger_id
        assert ledger_id is not None

        def take() -> tuple[int, int, Hash]:
            conn = self._writer()
            epoch = self._acquire_sync(conn, ledger_id)
            length, head = _read_head(conn, ledger_id)
            return epoch, length, head

        epoch, self._length, self._head = await self._hop("take the lease", take)
        self._epoch = epoch
        self._standby = False
        self._stale = False
        self._fenced = None
        self._lost = trio.Event()
        self._start_renewing()
        return epoch

    # -- renewal ---------------------------------------------------------------------------
    def _start_renewing(self) -> None:
        scope = trio.CancelScope()
        self._renewer = scope
        trio.lowlevel.spawn_system_task(
            self._renew_loop, scope, name=f"PostgresStorage lease {self._ledger_id!r}"
        )

    async def _renew_loop(self, scope: trio.CancelScope) -> None:
        """Renew every lease/3 until closed or fenced (a system task: never raises)."""
        with scope:
            while self._open and self._fenced is None:
                await trio.sleep(self.lease_timeout / 3)
                if not self._open or scope.cancel_called:
                    return
                try:
                    await self.renew()
                except Fenced:
                    return
                except Exception as exc:
                    log.warning("ledger %r: lease renewal failed: %s", self._ledger_id, exc)

    async def renew(self) -> None:
        """Extend this writer's lease by `lease_timeout` (the renewal task does it every
        lease/3; every batch does it too).

        Cancellation: once the worker thread runs, the renewal completes first.

        Raises:
            Fenced: the epoch is no longer current (this storage then refuses every append).
            StorageError: not open, a standby, or PostgreSQL failed.
        """
        self._require_open("renew the lease")
        epoch = self._epoch
        if epoch is None:
            raise StorageError(f"{self._where()}: a standby holds no lease to renew")
        self._check_fenced()

        def renew() -> None:
            conn = self._writer()
            row = conn.execute(
                _FENCE, (self.lease_timeout, self._ledger_id, epoch, self.holder)
            ).fetchone()
            if row is None:
                raise _Fence(*_current(conn, self._ledger_id))

        try:
            await self._hop("renew the lease", renew)
        except _Fence as exc:
            raise self._lose(exc) from None
        self.renewed_at = time.monotonic()

    def _lose(self, fence: _Fence) -> Fenced:
        error = Fenced(
            f"ledger {self._ledger_id!r} in {self._where()}: this writer's epoch {self._epoch} "
            f"is no longer current (epoch {fence.current} held by {fence.holder}): another "
            "writer took over; nothing of this batch was stored",
            epoch=self._epoch,
            current=fence.current,
        )
        if self._fenced is None:
            log.error("%s", error)
            self._fenced = error
            self._stale = True
            self._lost.set()
        return error

    def _check_fenced(self) -> None:
        if self._fenced is not None:
            raise Fenced(str(self._fenced), epoch=self._fenced.epoch, current=self._fenced.current)

    # -- head ------------------------------------------------------------------------------
    async def head(self) -> tuple[int, Hash]:
        """`(length, head hash)`. A writer serves it from memory (it is the only writer)
        except after a failed batch; a standby (and a fenced writer) reads the database.

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or PostgreSQL failed.
        """
        self._require_open("read the head")
        ledger_id = self._ledger_id
        assert ledger_id is not None
        if self._epoch is None or self._fenced is not None:
            length, head = await self._hop(
                "read the head",
                lambda: _read_head(self._reading_conn(), ledger_id),
                reader=True,
            )
            if self._epoch is None:
                self._length, self._head = length, head  # what a standby's read(start) reads to
            return length, head
        if self._stale:
            self._length, self._head = await self._hop(
                "read the head", lambda: _read_head(self._writer(), ledger_id)
            )
            self._stale = False
        else:
            await trio.lowlevel.checkpoint()
        assert self._head is not None
        return self._length, self._head

    # -- append ----------------------------------------------------------------------------
    async def append(self, batch: StorageBatch) -> None:
        """Store a batch as one transaction under the fence, committed when this returns.

        The transaction renews the lease with `UPDATE ... WHERE epoch = <mine>` first (the
        fence, holding the lease row's lock to the end), checks the stored last entry is the
        one this writer committed, writes entries with binary COPY and the other parts with
        batched upserts, and commits. One worker-thread hop.

        Cancellation: while waiting for the worker thread nothing is stored; once the thread
        runs, the batch commits (or fails) before the cancellation is delivered.

        Raises:
            Fenced: a standby, or this writer's epoch is no longer current (nothing stored;
                every later append is refused too).
            CommitUnknown: the connection broke during COMMIT (the batch may be stored).
            StorageError: not open, a `check_batch` rule, or PostgreSQL failed (nothing
                stored).
        """
        epoch = self._writing("append")
        if self._stale:
            await self.head()
        expected = self._length
        assert self._head is not None
        after = check_batch(batch, expected, self._head, backend=self)
        if batch.empty:
            await trio.lowlevel.checkpoint()
            return
        rows, cursors, tiles, keys = batch_rows(batch)
        state = {"committing": False}
        try:
            await trio.to_thread.run_sync(
                self._append_sync, epoch, self._tail(expected), rows, cursors, tiles, keys, state,
                limiter=self._limiter,
            )  # fmt: skip
        except Exception as exc:
            self._raise_append_error(exc, state["committing"])
        self._appended(batch, after)

    @asynccontextmanager
    async def append_stream(self) -> AsyncIterator[AppendStream]:
        """A batch written while its entries are still being made (`AppendStreams`).

        The batch's transaction opens at once in a worker thread (the fence and the tail
        check run while the caller hashes); entries given to `feed` are sent by binary COPY
        as they come, from the event loop in non-blocking mode (PostgreSQL inserts them while
        the next ones are hashed); `commit(batch)` ends the COPY, writes the other parts and
        commits. Leaving the block without `commit` rolls back: nothing stored. Same
        transaction, same rules and same errors as `append`. The writer connection is this
        block's until it ends (other writes on it wait).

        Cancellation: leaving the block (cancelled or not) rolls back, shielded; `commit`
        behaves as `append`.

        Raises:
            Fenced, StorageError: as `append` (before the block: a standby, fenced, closed).
        """
        epoch = self._writing("append")
        if self._stale:
            await self.head()
        assert self._head is not None
        # The writer connection is the stream's until its transaction ends (commit, or the
        # rollback at the block's end): then the limiter is released, so `head()` works on
        # the error path inside the block.
        await self._limiter.acquire()
        try:
            conn = self._conn
            psycopg = _psycopg()
            if (
                conn is None
                or conn.closed
                or conn.broken
                or conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE
            ):
                conn = await trio.to_thread.run_sync(self._idle_writer, limiter=self._stream_hops)
        except BaseException:
            self._limiter.release()
            raise
        stream = _Stream(self, conn, epoch, self._length, self._head, self._limiter.release)
        stream.begin()
        try:
            yield stream
        finally:
            await stream.close()

    def _idle_writer(self) -> Any:
        """The writer connection, reconnected if broken and idle (worker thread)."""
        conn = self._writer()
        psycopg = _psycopg()
        if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._stream_rollback(conn)
            conn = self._writer()
        return conn

    def _opening(self, epoch: int, encoding: str) -> bytes:
        """The simple query that opens an `append_stream` transaction: BEGIN, the fence, the
        stored last entry, COPY (its values inlined as SQL literals, encoded in the
        connection's client `encoding`; cached per epoch and encoding)."""
        cached = self._opening_sql
        if cached is not None and cached[0] == (epoch, encoding):
            return cached[1]
        sql = _psycopg_sql()
        fence = sql.SQL(_FENCE.replace("%s", "{}")).format(
            sql.Literal(float(self.lease_timeout)),
            sql.Literal(self._ledger_id),
            sql.Literal(epoch),
            sql.Literal(self.holder),
        )
        text = f"BEGIN; {fence.as_string(None)}; {_LAST_HEX}; {_COPY}".encode(encoding)
        self._opening_sql = ((epoch, encoding), text)
        return text

    async def _lost_fence(self, conn: Any) -> Exception:
        """The `_Fence` for a stream whose fence matched no lease row (after its rollback)."""
        ledger_id = self._ledger_id
        try:
            current = await trio.to_thread.run_sync(
                lambda: _current(self._writer(), ledger_id), limiter=self._stream_hops
            )
        except Exception as exc:
            return exc
        return _Fence(*current)

    def _writing(self, what: str) -> int:
        """The epoch to write under; refuses a closed, standby or fenced storage."""
        self._require_open(what)
        if self._epoch is None:
            raise Fenced(
                f"cannot append to ledger {self._ledger_id!r}: this PostgresStorage "
                f"({self._where()}) is a standby (it holds no lease)"
            )
        self._check_fenced()
        return self._epoch

    def _tail(self, expected: int) -> tuple[int, bytes] | None:
        """`(seq, hash)` of the last entry this writer committed (None: empty)."""
        assert self._head is not None
        return (expected - 1, bytes(self._head)) if expected else None

    def _appended(self, batch: StorageBatch, after: int) -> None:
        if batch.entries:
            self._length = after
            self._head = batch.entries[-1].hash
        self.renewed_at = time.monotonic()

    def _raise_append_error(self, exc: Exception, committing: bool) -> NoReturn:
        """Raise what `append` raises for what its transaction raised."""
        if isinstance(exc, _Fence):
            raise self._lose(exc) from None
        self._stale = True
        if isinstance(exc, _Moved):
            raise StorageError(f"{self._where()}: append refused: {exc}") from None
        if isinstance(exc, StorageError):
            raise exc
        # PostgreSQL or the driver failed (or something unexpected did: still a storage error,
        # with the cause chained)
        if committing:
            raise CommitUnknown(
                f"{self._where()}: the connection failed during COMMIT, the batch may or "
                f"may not be stored: {_reason(exc)}"
            ) from exc
        raise StorageError(
            f"{self._where()}: append failed, nothing stored: {_reason(exc)}"
        ) from exc

    def _append_sync(
        self,
        epoch: int,
        tail: tuple[int, bytes] | None,
        rows: list[tuple[int, bytes, bytes]],
        cursors: list[tuple[str, int]],
        tiles: list[tuple[int, int, bytes]],
        keys: list[tuple[str, str, int, int, int]],
        state: dict[str, bool],
    ) -> None:
        conn = self._writer()
        psycopg = _psycopg()
        tx = conn.transaction()
        tx.__enter__()
        try:
            cur = conn.cursor()
            cur.execute(_FENCE, (self.lease_timeout, self._ledger_id, epoch, self.holder))
            if cur.fetchone() is None:
                raise _Fence(*_current(conn, self._ledger_id))
            if rows:
                cur.execute(_LAST)
                found = cur.fetchone()
                found_tail = None if found is None else (int(found[0]), bytes(found[1]))
                if found_tail != tail:
                    raise _Moved(found_tail, tail)
                with cur.copy(_COPY) as copy:
                    copy.set_types(["int8", "bytea", "bytea"])
                    for row in rows:
                        copy.write_row(row)
            _upsert_parts(cur, cursors, tiles, keys)
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        state["committing"] = True
        tx.__exit__(None, None, None)  # COMMIT

    def _stream_commit(
        self,
        conn: Any,
        cursors: list[tuple[str, int]],
        tiles: list[tuple[int, int, bytes]],
        keys: list[tuple[str, str, int, int, int]],
        state: dict[str, bool],
    ) -> None:
        """`append_stream`'s last step (worker thread): the other parts, then COMMIT."""
        try:
            _upsert_parts(conn.cursor(), cursors, tiles, keys)
        except BaseException:
            self._stream_rollback(conn)
            raise
        state["committing"] = True
        conn.execute("COMMIT")

    def _stream_rollback(self, conn: Any) -> None:
        """ROLLBACK (worker thread); a connection that cannot is closed (replaced later)."""
        try:
            conn.execute("ROLLBACK")
        except Exception:
            log.warning("could not roll back an abandoned append; reconnecting", exc_info=True)
            with contextlib.suppress(Exception):
                conn.close()

    # -- capabilities ----------------------------------------------------------------------
    async def load_cursors(self) -> dict[str, int]:
        """Every stored cursor, module id -> highest seq processed.

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or PostgreSQL failed.
        """
        self._require_open("load cursors")

        def load() -> dict[str, int]:
            rows = self._reading_conn().execute("SELECT module, seq FROM cursors").fetchall()
            return {str(m): int(q) for m, q in rows}

        return await self._hop("load cursors", load, reader=True)

    async def read_tiles(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], TreeTile]:
        """The stored tiles among `keys` (`(level, index)` pairs); missing ones are absent.

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or PostgreSQL failed. IntegrityError: a stored tile is
                not a whole number of 32-byte hashes.
        """
        self._require_open("read tree tiles")
        wanted = list(dict.fromkeys((int(level), int(index)) for level, index in keys))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return {}

        def load() -> list[tuple[int, int, Any]]:
            levels = [level for level, _ in wanted]
            indexes = [index for _, index in wanted]
            rows = (
                self._reading_conn()
                .execute(
                    "SELECT t.level, t.idx, t.hashes FROM tree_tiles t JOIN "
                    "unnest(%s::int[], %s::bigint[]) AS k(level, idx) "
                    "ON t.level = k.level AND t.idx = k.idx",
                    (levels, indexes),
                )
                .fetchall()
            )
            return [(int(a), int(b), bytes(c)) for a, b, c in rows]

        return decode_tiles(await self._hop("read tree tiles", load, reader=True), self._where())

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        """The record stored under `key`, or None.

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or PostgreSQL failed.
        """
        self._require_open("look up an idempotency key")

        def load() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = (
                self._reading_conn()
                .execute(
                    "SELECT key, fingerprint, first_seq, count, created FROM idempotency "
                    "WHERE key = %s",
                    (key,),
                )
                .fetchone()
            )
            return row

        row = await self._hop("look up an idempotency key", load, reader=True)
        if row is None:
            return None
        return IdempotencyRecord(
            key=row[0],
            fingerprint=row[1],
            first_seq=int(row[2]),
            count=int(row[3]),
            created=int(row[4]),
        )

    async def prune_idempotency(self, created_before: int) -> int:
        """Delete the keys committed before `created_before` (UTC microseconds), under the
        fence, in one transaction; return how many.

        Cancellation: once the thread runs, the delete commits before the cancellation is
        delivered.

        Raises:
            Fenced: a standby, or the epoch is no longer current (nothing deleted).
            StorageError: not open, or PostgreSQL failed (nothing deleted).
        """
        self._require_open("prune idempotency keys")
        epoch = self._epoch
        if epoch is None:
            raise Fenced(f"cannot prune idempotency keys: {self._where()}: this is a standby")
        self._check_fenced()

        def prune() -> int:
            conn = self._writer()
            with conn.transaction():
                cur = conn.cursor()
                cur.execute(_FENCE, (self.lease_timeout, self._ledger_id, epoch, self.holder))
                if cur.fetchone() is None:
                    raise _Fence(*_current(conn, self._ledger_id))
                cur.execute("DELETE FROM idempotency WHERE created < %s", (created_before,))
                return int(cur.rowcount)

        try:
            return await self._hop("prune idempotency keys", prune)
        except _Fence as exc:
            raise self._lose(exc) from None

    # -- read ------------------------------------------------------------------------------
    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries `start <= seq < stop` in seq order (`None`: up to the head at this call; on
        a standby, up to what the last `head()` saw).

        Fetches bounded chunks (at most 512 rows or about 4 MiB), one worker-thread hop per
        chunk on the read connection. The iterator holds nothing between chunks. Cancellation:
        nothing to undo.

        Raises:
            ValueError: bad range (at once). StorageError: not open (at once), closed while
                reading, or PostgreSQL failed. IntegrityError: an entry cannot be decoded or
                is missing (naming its seq).
        """
        check_range(start, stop)
        self._require_open("read")
        end = self._length if stop is None else min(stop, self._length)

        async def fetch(first: int, last: int) -> list[_Row]:
            if not self._open:
                raise StorageError(f"cannot read: PostgresStorage ({self._where()}) was closed")
            return await self._hop("read", self._fetch_chunk, first, last, reader=True)

        return _Entries(fetch, start, end)

    def _fetch_chunk(self, start: int, stop: int) -> list[_Row]:
        cur = self._reading_conn().execute(_SELECT, (start, stop, _CHUNK_ROWS))
        rows: list[_Row] = []
        size = 0
        for seq, canonical, digest in cur:
            rows.append((int(seq), bytes(canonical), bytes(digest)))
            size += len(canonical)
            if size >= _CHUNK_BYTES:
                break
        cur.close()
        return rows

    # -- close -----------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop renewing, release the lease (a writer: it expires now, so a standby can take
        over at once; the epoch stays), close both connections. Idempotent.

        Cancellation: shielded; the close always completes.

        Raises:
            Nothing: a failure to release the lease is logged (the lease then expires by
            itself after `lease_timeout`).
        """
        if not self._open:
            await trio.lowlevel.checkpoint()
            return
        self._open = False
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None
        epoch, self._epoch = self._epoch, None
        ledger_id = self._ledger_id

        def release() -> None:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                return
            conn.execute(
                "UPDATE lease SET expires_at = 'epoch' "
                "WHERE ledger_id = %s AND epoch = %s AND holder = %s",
                (ledger_id, epoch, self.holder),
            )

        with trio.CancelScope(shield=True):
            if epoch is not None and self._fenced is None:
                try:
                    await self._hop("release the lease", release)
                except Exception as exc:
                    log.warning("ledger %r: could not release the lease: %s", ledger_id, exc)
            await self._drop_connections()

    async def _drop_connections(self) -> None:
        conn, reader = self._conn, self._reader
        self._conn = self._reader = None

        def shut(c: Any) -> None:
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(shut, reader, limiter=self._read_limiter)
            await trio.to_thread.run_sync(shut, conn, limiter=self._limiter)


def _reason(exc: BaseException) -> str:
    """A psycopg error in one line (libpq's message, SQLSTATE when there is one)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    state = getattr(exc, "sqlstate", None)
    return f"{text} (SQLSTATE {state})" if state else text


def _current(conn: Any, ledger_id: str | None) -> tuple[int | None, str | None]:
    row = conn.execute("SELECT epoch, holder FROM lease WHERE ledger_id = %s", (ledger_id,))
    found = row.fetchone()
    return (None, None) if found is None else (int(found[0]), str(found[1]))


def _read_head(conn: Any, ledger_id: str) -> tuple[int, Hash]:
    row = conn.execute(_LAST).fetchone()
    if row is None:
        return 0, genesis(ledger_id)
    seq, digest = row
    try:
        return int(seq) + 1, Hash(bytes(digest))
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"entry {seq}: stored hash is not 32 bytes", seq=int(seq)) from exc


def _check_tail(conn: Any, ledger_id: str) -> tuple[int, Hash]:
    """`(length, head)` after checking seqs run from 0 and the last entry's chain hash."""
    tail = conn.execute(
        "SELECT seq, canonical, hash FROM entries ORDER BY seq DESC LIMIT 2"
    ).fetchall()
    if not tail:
        return 0, genesis(ledger_id)
    tail = [(int(s), bytes(c), bytes(h)) for s, c, h in tail]
    first = conn.execute("SELECT min(seq) FROM entries").fetchone()[0]
    return check_tail(ledger_id, tail, first, _entry)


async def verify_schema(
    dsn: str | None,
    *,
    schema: str = "nucleus",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, int, Hash]:
    """Verify a PostgreSQL ledger's whole chain without writing; `(ledger id, length, head)`.

    Reads the ledger id from the schema's `meta` table and streams every entry in bounded
    chunks through `ChainVerifier` from that ledger's genesis, on one autocommit connection
    (beside a live writer, which it never blocks; entries committed after it started are
    not included).

    Cancellation: nothing to undo; the connection is closed.

    Raises:
        StorageError: cannot connect, or the schema is not a ledger schema.
        IntegrityError: naming the seq of the first entry that does not verify.
    """
    probe = PostgresStorage(dsn, schema=schema, standby=True)
    limiter = trio.CapacityLimiter(1)
    psycopg = _psycopg()

    async def hop(what: str, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except psycopg.Error as exc:
            raise StorageError(f"{probe._where()}: {what} failed: {_reason(exc)}") from exc

    conn = await hop("connect", partial(probe._connect, writer=False))
    try:

        def meta() -> tuple[str, int]:
            found = conn.execute("SELECT to_regclass(%s)", (f"{schema}.meta",)).fetchone()
            if found is None or found[0] is None:
                raise StorageError(f"{probe._where()} holds no nucleus_actors ledger")
            rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            last = conn.execute("SELECT max(seq) FROM entries").fetchone()
            count = 0 if last is None or last[0] is None else int(last[0]) + 1
            return str(rows.get("ledger_id")), count

        ledger_id, total = await hop("read the meta table", meta)

        def chunk(first: int, last: int) -> list[_Row]:
            rows = conn.execute(_SELECT, (first, last, _CHUNK_ROWS)).fetchall()
            return [(int(s), bytes(c), bytes(h)) for s, c, h in rows]

        async def fetch(first: int, last: int) -> list[_Row]:
            return await hop("read", chunk, first, last)

        verifier = await _verify_chain(ledger_id, total, fetch, progress)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(conn.close, limiter=limiter)
    return ledger_id, verifier.length, verifier.head
