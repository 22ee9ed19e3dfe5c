"""`SQLiteStorage`: the embedded durable backend (stdlib `sqlite3`, WAL), and `verify_file`.

File layout (format version 2), next to `<path>` itself:

```
<path>          the SQLite database (WAL mode)
<path>-wal      SQLite's write-ahead log (present while open; merged into <path> on close)
<path>-shm      SQLite's WAL index
<path>.lock     sidecar file whose OS flock marks the single writer (never deleted)

CREATE TABLE meta    (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    -- format_version '2', ledger_id, hash_scheme, created_by
CREATE TABLE entries (seq INTEGER PRIMARY KEY, canonical BLOB NOT NULL, hash BLOB NOT NULL);
    -- canonical: the exact RFC 8785 bytes hashed into LEAF_seq; hash: CHAIN_seq (32 bytes)
-- format 2 (migration from 1: add these tables):
CREATE TABLE cursors (module TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE tree_tiles (level INTEGER NOT NULL, idx INTEGER NOT NULL, hashes BLOB NOT NULL,
                         PRIMARY KEY (level, idx)) WITHOUT ROWID;
CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
                          first_seq INTEGER NOT NULL, count INTEGER NOT NULL,
                          created INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX idempotency_created ON idempotency (created);
```

Migrations: `_MIGRATIONS` lists the steps from each format to the next, in order. Opening an
older file runs the missing steps, each in its own transaction (the format version in `meta` is
updated in the same transaction, so a crash leaves the file at the last completed step); a new
file is created at format 1 and migrated in its creating transaction, so the steps are the one
definition of the schema. A file newer than this build is refused.

Threading: `sqlite3` blocks, so every call runs in a worker thread via `trio.to_thread.run_sync`.
An open storage has two connections, each with its own `trio.CapacityLimiter(1)` (one thread at
a time uses a connection): the writer (batches, head re-reads, migrations) and a read-only
reader (range reads, capability reads), so that reads never queue behind a commit and its fsync
(WAL lets a reader see every committed transaction while a writer works). One batch is one
transaction in one thread hop; reads fetch bounded chunks, one hop per chunk. Hops are never
abandoned on cancellation: a thread that holds a connection always finishes before anything
else touches it.

Locks: the sidecar `<path>.lock` (by path) and an OS flock on the database file itself (by
inode: every alias of the file, a hard link, a symlink or a bind mount, conflicts). See
`_Inodes` for why that descriptor is handled with care.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar

import trio

from ..errors import IntegrityError, StorageError
from ..hashing import ChainVerifier, decode_entry, genesis
from ..record import Entry, Hash
from ._base import (
    STORAGE_CONTRACT,
    IdempotencyRecord,
    StorageBatch,
    TreeTile,
    batch_rows,
    check_batch,
    check_range,
    check_tail,
    decode_tiles,
)

__all__ = ["SQLiteStorage", "verify_file"]

log = logging.getLogger("nucleus_actors.storage.sqlite")

HASH_SCHEME: Final = "blake3-jcs-chain/1"

_T = TypeVar("_T")
_Row = tuple[Any, Any, Any]

# A read hop returns at most this many rows, and stops early once it holds this many bytes of
# canonical data (always at least one row): a reader holds one chunk in memory at a time.
_CHUNK_ROWS: Final = 512
_CHUNK_BYTES: Final = 4 * 1024 * 1024
_BUSY_TIMEOUT_MS: Final = 10_000

# Format 1, as every file starts; later formats are reached through _MIGRATIONS.
_SCHEMA_1: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE entries (seq INTEGER PRIMARY KEY, canonical BLOB NOT NULL, hash BLOB NOT NULL)",
)
_UPSERT_CURSOR: Final = (
    "INSERT INTO cursors (module, seq) VALUES (?, ?) "
    "ON CONFLICT (module) DO UPDATE SET seq = excluded.seq"
)
# A wider tile replaces a partial one; a narrower one never replaces a wider one.
_UPSERT_TILE: Final = (
    "INSERT INTO tree_tiles (level, idx, hashes) VALUES (?, ?, ?) "
    "ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes "
    "WHERE length(excluded.hashes) >= length(tree_tiles.hashes)"
)
_UPSERT_KEY: Final = (
    "INSERT INTO idempotency (key, fingerprint, first_seq, count, created) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "first_seq = excluded.first_seq, count = excluded.count, created = excluded.created"
)

Progress = Callable[[int, int], None]
"""A migration step reports `(done, total)` through this as it goes (long steps only)."""


@dataclass(frozen=True, slots=True)
class _Migration:
    """One step from format `version - 1` to format `version`, run in one transaction."""

    version: int
    what: str
    apply: Callable[[sqlite3.Connection, Progress], None]


def _to_2(conn: sqlite3.Connection, progress: Progress) -> None:
    conn.execute(
        "CREATE TABLE cursors (module TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE TABLE tree_tiles (level INTEGER NOT NULL, idx INTEGER NOT NULL, "
        "hashes BLOB NOT NULL, PRIMARY KEY (level, idx)) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE TABLE idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
        "first_seq INTEGER NOT NULL, count INTEGER NOT NULL, created INTEGER NOT NULL) "
        "WITHOUT ROWID"
    )
    conn.execute("CREATE INDEX idempotency_created ON idempotency (created)")


_MIGRATIONS: Final[tuple[_Migration, ...]] = (
    _Migration(2, "add tables cursors, tree_tiles and idempotency (storage contract v2)", _to_2),
)
assert [m.version for m in _MIGRATIONS] == list(range(2, len(_MIGRATIONS) + 2))

FORMAT_VERSION: Final = 1 + len(_MIGRATIONS)
"""The format version this build writes; it reads and migrates every version from 1 up."""
_PROGRESS_EVERY: Final = 5.0  # seconds between progress log lines of a long migration step
_INSERT: Final = "INSERT INTO entries (seq, canonical, hash) VALUES (?, ?, ?)"
_SELECT: Final = "SELECT seq, canonical, hash FROM entries WHERE seq >= ? AND seq < ? ORDER BY seq"
_TAIL: Final = "SELECT seq, canonical, hash FROM entries ORDER BY seq DESC LIMIT 2"
_LAST: Final = "SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1"


class _Moved(sqlite3.DatabaseError):
    """The file's last entry is not the one this storage wrote: another writer was here."""

    def __init__(self, expected: tuple[int, bytes] | None, found: tuple[Any, ...] | None) -> None:
        def show(row: tuple[Any, ...] | None) -> str:
            if row is None:
                return "no entries"
            digest = row[1].hex() if isinstance(row[1], bytes) else repr(row[1])
            return f"entry {row[0]} with hash {digest}"

        super().__init__(
            f"the file's last entry changed behind this writer (expected {show(expected)}, "
            f"found {show(found)}): has another writer written to it?"
        )


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(path))}?mode={mode}"


def _check_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"SQLiteStorage path must be a str or os.PathLike, got {path!r}")
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raise TypeError(f"SQLiteStorage path must be a str path, got {raw!r}")
    if raw in ("", ":memory:") or raw.startswith("file:"):
        raise ValueError(
            f"SQLiteStorage needs a file path, got {raw!r} (for a ledger kept in memory use "
            "MemoryStorage; URIs are not accepted)"
        )
    return Path(os.path.abspath(raw))


def _read_meta(conn: sqlite3.Connection, path: Path) -> tuple[dict[str, str], int]:
    """The meta table of an existing ledger file and its format version (checked first:
    1 to `FORMAT_VERSION`; older ones are for the caller to migrate or read as they are)."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "meta" not in tables or "entries" not in tables:
        raise StorageError(
            f"{path} is an SQLite database but not a nucleus_actors ledger file (it has no "
            f"'meta' and 'entries' tables; tables found: {sorted(tables)})"
        )
    meta = {str(key): str(value) for key, value in conn.execute("SELECT key, value FROM meta")}
    raw = meta.get("format_version")
    version = int(raw) if raw is not None and raw.isascii() and raw.isdigit() else None
    if version is None or version < 1:
        raise StorageError(
            f"ledger file {path} has format version {raw!r}, which no release of "
            f"nucleus_actors wrote; this build reads format versions 1 to {FORMAT_VERSION}"
        )
    if version > FORMAT_VERSION:
        raise StorageError(
            f"ledger file {path} has format version {version}, newer than this build of "
            f"nucleus_actors reads (format versions 1 to {FORMAT_VERSION}); it was written by "
            f"{meta.get('migrated_by', meta.get('created_by', 'a newer release'))}: upgrade "
            "nucleus_actors to open it"
        )
    for key in ("ledger_id", "hash_scheme"):
        if key not in meta:
            raise StorageError(f"ledger file {path} has no {key!r} in its meta table")
    if meta["hash_scheme"] != HASH_SCHEME:
        raise StorageError(
            f"ledger file {path} uses hash scheme {meta['hash_scheme']!r}; this build of "
            f"nucleus_actors computes {HASH_SCHEME!r}"
        )
    return meta, version


class _Reporter:
    """Logs a migration step's `(done, total)` at most every `_PROGRESS_EVERY` seconds."""

    def __init__(self, path: Path, step: _Migration) -> None:
        self._path = path
        self._step = step
        self._next = time.monotonic() + _PROGRESS_EVERY

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + _PROGRESS_EVERY
        share = f" ({100 * done / total:.0f}%)" if total else ""
        log.info(
            "ledger file %s: migration to format %d: %d of %d done%s",
            self._path, self._step.version, done, total, share,
        )  # fmt: skip


def _migrate(conn: sqlite3.Connection, path: Path, version: int) -> int:
    """Run every migration step after `version`, each in its own transaction; the new version.

    A step and the format version it reaches commit together: a crash (or an error) leaves the
    file at the last step completed, and the next open goes on from there.
    """
    for step in _MIGRATIONS:
        if step.version <= version:
            continue
        log.info(
            "ledger file %s: migrating format %d -> %d: %s",
            path, step.version - 1, step.version, step.what,
        )  # fmt: skip
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[
                0
            ]
            if str(found) != str(step.version - 1):
                raise StorageError(
                    f"ledger file {path}: format version changed to {found!r} while migrating "
                    f"it (expected {step.version - 1})"
                )
            step.apply(conn, _Reporter(path, step))
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [("format_version", str(step.version)), ("migrated_by", _created_by())],
            )
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        version = step.version
        log.info(
            "ledger file %s: now format %d (step took %.3f s)",
            path, version, time.monotonic() - started,
        )  # fmt: skip
    return version


def _create(conn: sqlite3.Connection, ledger_id: str) -> None:
    """Write a new ledger file's schema, inside the caller's transaction: format 1, then every
    migration step (silently), so that the steps are the one definition of the schema."""
    for statement in _SCHEMA_1:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("format_version", str(FORMAT_VERSION)),
            ("ledger_id", ledger_id),
            ("hash_scheme", HASH_SCHEME),
            ("created_by", _created_by()),
        ],
    )
    for step in _MIGRATIONS:
        step.apply(conn, lambda done, total: None)


def _entry(row: _Row) -> Entry:
    """Decode one stored row; IntegrityError (naming its seq) if it is not a valid entry."""
    seq, canonical, digest = row
    if not isinstance(canonical, bytes) or not isinstance(digest, bytes):
        raise IntegrityError(
            f"entry {seq}: stored canonical bytes and hash must be BLOBs, found "
            f"{type(canonical).__name__} and {type(digest).__name__}",
            seq=seq,
        )
    return decode_entry(seq, canonical, digest)


def _fetch_chunk(conn: sqlite3.Connection, start: int, stop: int) -> list[_Row]:
    """Rows `start <= seq < stop`, at most one bounded chunk (at least one row if any)."""
    rows: list[_Row] = []
    size = 0
    cursor = conn.execute(_SELECT, (start, stop))
    try:
        for row in cursor:
            rows.append(row)
            canonical = row[1]
            size += len(canonical) if isinstance(canonical, bytes | str) else 0
            if len(rows) >= _CHUNK_ROWS or size >= _CHUNK_BYTES:
                break
    finally:
        cursor.close()  # ends the statement, so no read transaction outlives the hop
    return rows


def _created_by() -> str:
    try:
        return f"nucleus_actors {importlib.metadata.version('nucleus_actors')}"
    except importlib.metadata.PackageNotFoundError:
        return "nucleus_actors"


class _Entries:
    """Async iterator over stored entries `start <= seq < stop`, one chunk in memory at a time.

    A plain iterator object rather than an async generator, so abandoning it half-way leaves
    nothing to finalize (each chunk's statement is already closed). Rows are decoded one at a
    time as they are consumed, so an undecodable or missing entry is reported only after every
    entry before it was handed out. `on_chunk(next_seq)` runs once the last entry of each chunk
    has been consumed.
    """

    __slots__ = ("_fetch", "_index", "_next", "_on_chunk", "_rows", "_stop")

    def __init__(
        self,
        fetch: Callable[[int, int], Awaitable[list[_Row]]],
        start: int,
        stop: int,
        on_chunk: Callable[[int], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._next = start
        self._stop = stop
        self._on_chunk = on_chunk
        self._rows: list[_Row] = []
        self._index = 0

    def __aiter__(self) -> _Entries:
        return self

    async def __anext__(self) -> Entry:
        if self._index >= len(self._rows):
            if self._rows and self._on_chunk is not None:
                self._on_chunk(self._next)
            self._rows, self._index = [], 0
            if self._next >= self._stop:
                raise StopAsyncIteration
            self._rows = await self._fetch(self._next, self._stop)
            if not self._rows:
                raise IntegrityError(
                    f"entry {self._next} is missing from storage (expected entries up to "
                    f"{self._stop - 1})",
                    seq=self._next,
                )
        row = self._rows[self._index]
        self._index += 1
        if row[0] != self._next:
            self._rows, self._index = [], 0
            raise IntegrityError(
                f"entry {self._next} is missing from storage (next stored seq is {row[0]})",
                seq=self._next,
            )
        self._next += 1
        return _entry(row)


async def _verify_chain(
    ledger_id: str,
    total: int,
    fetch: Callable[[int, int], Awaitable[list[_Row]]],
    progress: Callable[[int, int], None] | None,
) -> ChainVerifier:
    """Entries 0 to `total - 1`, fetched a chunk at a time, fed through a `ChainVerifier` from
    the genesis of `ledger_id` (what `verify_file` and PostgreSQL's `verify_schema` check).

    `progress(done, total)` runs after each chunk, and once as `(0, 0)` for an empty ledger.

    Raises:
        IntegrityError: naming the seq of the first entry that does not verify.
    """
    verifier = ChainVerifier(genesis(ledger_id))

    def on_chunk(done: int) -> None:
        if progress is not None:
            progress(done, total)

    async for entry in _Entries(fetch, 0, total, on_chunk):
        verifier.feed(entry)
    if progress is not None and total == 0:
        progress(0, 0)
    return verifier


_Key = tuple[int, int]  # (st_dev, st_ino) of a database file


class _Inodes:
    """Process-wide bookkeeping of the database files (inodes) this process holds open.

    A writer holds one extra descriptor of its database file, with an OS `flock` on it, from
    `open` until after SQLite has closed: flock belongs to the inode, so a second writer
    conflicts however it names the file (hard link, symlink, bind mount), in any process.

    SQLite's own locks are POSIX (fcntl) locks, and the OS drops all of a process's POSIX locks
    on a file when the process closes *any* descriptor of it. So this process must never close
    such a descriptor while one of its SQLite connections has the file open: a second writer in
    this process is refused from this table before it opens a descriptor, and a descriptor that
    would be closed while `verify_file` readers of this process have the file open is parked
    until the last of them is done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writers: dict[_Key, Path] = {}
        self._readers: Counter[_Key] = Counter()
        self._parked: dict[_Key, list[int]] = {}

    def claim(self, path: Path) -> tuple[int, _Key]:
        """Open `path` for writing and flock it; the descriptor and the file's key.

        Raises:
            StorageError: the file is read-only (permissions, immutable, read-only mount), or
                it is already open for writing, in this process or another, under any name.
        """
        with self._lock:
            with contextlib.suppress(OSError):
                found = os.stat(path)
                held = self._writers.get((found.st_dev, found.st_ino))
                if held is not None:
                    raise self._busy(path, held)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise StorageError(
                        f"ledger file {path} is read-only ({exc.strerror}): a writer must be "
                        "able to write it (check its permissions, `lsattr` for the immutable "
                        "flag, and whether its filesystem is mounted read-only); to read or "
                        "verify it without writing use verify_file / `nucleus verify`"
                    ) from exc
                raise StorageError(f"cannot open ledger file {path}: {exc.strerror}") from exc
            stat = os.fstat(fd)
            key = (stat.st_dev, stat.st_ino)
            try:
                if key in self._writers:
                    raise self._busy(path, self._writers[key])
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except StorageError:
                self._close(key, fd)
                raise
            except OSError as exc:
                self._close(key, fd)
                raise StorageError(
                    f"ledger file {path} is already open for writing by another process, "
                    "through this name or another one for the same file (a hard link, a "
                    "symlink or a bind mount: the database file itself is locked); a ledger "
                    "file has one writer at a time"
                ) from exc
            self._writers[key] = path
            return fd, key

    @staticmethod
    def _busy(path: Path, held: Path) -> StorageError:
        alias = "" if held == path else f" as {held} (the same file under another name)"
        return StorageError(
            f"ledger file {path} is already open for writing in this process{alias}; a "
            "ledger file has one writer at a time"
        )

    def release(self, key: _Key, fd: int) -> None:
        """The writer of `key` has closed SQLite: drop its flock descriptor (or park it)."""
        with self._lock:
            self._writers.pop(key, None)
            self._close(key, fd)

    def _close(self, key: _Key, fd: int) -> None:
        if self._readers[key] or key in self._writers:
            self._parked.setdefault(key, []).append(fd)  # see the class docstring
            return
        for parked in [*self._parked.pop(key, []), fd]:
            with contextlib.suppress(OSError):
                fcntl.flock(parked, fcntl.LOCK_UN)
                os.close(parked)

    @contextlib.contextmanager
    def reading(self, path: Path) -> Iterator[None]:
        """Mark `path` as open by a SQLite reader of this process for the block."""
        try:
            stat = os.stat(path)
        except OSError:
            yield  # nothing to protect: SQLite will report the missing file
            return
        key = (stat.st_dev, stat.st_ino)
        with self._lock:
            self._readers[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers[key] -= 1
                if not self._readers[key]:
                    del self._readers[key]
                    if key not in self._writers:
                        for parked in self._parked.pop(key, []):
                            with contextlib.suppress(OSError):
                                os.close(parked)


_INODES: Final = _Inodes()


class SQLiteStorage:
    """A ledger in one SQLite file (WAL): durable, reopenable, one writer at a time.

    `open` creates the file (and its `meta` table: ledger id, format version, hash scheme) or
    checks that an existing one belongs to the ledger, has a format this build reads, and that
    its last entry's chain hash recomputes from the one before. Each `append` batch is one
    transaction, committed before `append` returns. See docs/storage.md.

    Durability (`durability=`, SQLite's `synchronous` pragma in WAL mode):

    * `"full"` (default): every commit is fsynced before `append` returns: an acknowledged
      append survives a process crash, an OS crash and a power loss.
    * `"normal"`: commits are written to the WAL but fsynced only at checkpoints. A process
      crash loses nothing; an OS crash or power loss may lose the most recently acknowledged
      appends (the file stays consistent, a valid prefix of the chain), and their seqs are then
      reused by later appends, so receipts already handed out for them no longer match.

    A sidecar `<path>.lock` and the database file itself (its inode) hold an OS `flock` from
    `open` to `close`: a second writer, in this process or another, through this path or any
    other name of the same file (hard link, symlink, bind mount), gets `StorageError`; the OS
    releases both if the process dies. A read-only file is refused at `open`.

    Reads (`read`, `load_cursors`, `read_tiles`, `get_idempotency`) use their own read-only
    connection, so they never wait for a commit (and its fsync) in progress.

    Args:
        path: the database file (created on first open; its directory must exist).
        durability: `"full"` (default) or `"normal"`, as above.

    Raises:
        TypeError: `path` is not a str or path-like.
        ValueError: `path` is empty, `":memory:"` or a URI, or `durability` is not one of
            `"full"`, `"normal"`.
    """

    FORMAT_VERSION: Final = FORMAT_VERSION
    """The file format version this build writes (it reads and migrates every earlier one)."""

    storage_contract: ClassVar[int] = STORAGE_CONTRACT
    """Storage contract v2: `append` takes a `StorageBatch`; every capability is implemented
    (`CursorStore`, `TreeStore`, `IdempotencyStore`)."""

    def __init__(
        self, path: str | os.PathLike[str], *, durability: Literal["full", "normal"] = "full"
    ) -> None:
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', got {durability!r}")
        self.path: Final[Path] = _check_path(path)
        """Absolute path of the database file (resolved at construction)."""
        self.durability: Final[Literal["full", "normal"]] = durability
        """The durability setting (`"full"` or `"normal"`)."""
        self.lock_path: Final[Path] = self.path.with_name(self.path.name + ".lock")
        """The sidecar lock file, `<path>.lock`."""
        self._limiter = trio.CapacityLimiter(1)  # the writer connection
        self._read_limiter = trio.CapacityLimiter(1)  # the reader connection
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._inode: tuple[int, _Key] | None = None
        self._ledger_id: str | None = None
        self._length = 0
        self._head: Hash | None = None
        self._stale = False  # a failed batch left the cached head unknown: re-read it

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<SQLiteStorage {str(self.path)!r} {self.durability} {state}>"

    # -- threads ---------------------------------------------------------------------------
    async def _hop(
        self,
        what: str,
        fn: Callable[..., _T],
        *args: Any,
        limiter: trio.CapacityLimiter | None = None,
    ) -> _T:
        """Run `fn(*args)` in a worker thread under the writer's limiter (or `limiter`); sqlite
        errors -> StorageError."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite ledger file {self.path}: {what} failed: {exc}") from exc

    async def _read_hop(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """`_hop` on the reader connection's limiter (never queued behind a commit)."""
        return await self._hop(what, fn, *args, limiter=self._read_limiter)

    def _connection(self, what: str) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError(f"cannot {what}: SQLiteStorage {self.path} is not open")
        return self._conn

    def _reading(self, what: str) -> sqlite3.Connection:
        if self._reader is None:
            raise StorageError(f"cannot {what}: SQLiteStorage {self.path} is not open")
        return self._reader

    # Test seam: the class of the connection (a subclass can inject failures).
    _factory: type[sqlite3.Connection] = sqlite3.Connection

    # -- open ------------------------------------------------------------------------------
    async def open(self, ledger_id: str) -> None:
        """Take the writer lock, then create the ledger file or check the existing one.

        Checks, in order: the locks are free (the sidecar, then the database file's inode); the
        file can be written; it is a ledger file of a format version this build reads
        (an older one is migrated); it belongs to `ledger_id`; its last entry's chain hash
        recomputes from the previous entry's (the full chain is checked by
        `LedgerEngine.verify` / `verify_file`). Then it opens the read connection.

        Cancellation: while waiting for the worker thread nothing has happened; once the
        thread runs, the open completes (or fails leaving nothing held) before the
        cancellation is delivered.

        Raises:
            StorageError: already open; a lock is held by another writer (through any name
                of the file); the file is read-only, cannot be opened, is not a ledger file,
                has an unknown or newer format version, or belongs to another ledger (all
                naming the file).
            IntegrityError: the last entry does not verify (naming its seq).
        """
        if self._conn is not None:
            raise StorageError(
                f"SQLiteStorage {self.path} is already open (ledger {self._ledger_id!r})"
            )
        conn, reader, length, head = await self._hop("open", self._open_sync, ledger_id)
        self._conn = conn
        self._reader = reader
        self._ledger_id = ledger_id
        self._length = length
        self._head = head
        self._stale = False

    def _open_sync(
        self, ledger_id: str
    ) -> tuple[sqlite3.Connection, sqlite3.Connection, int, Hash]:
        fd = self._take_lock()
        conn: sqlite3.Connection | None = None
        reader: sqlite3.Connection | None = None
        inode: tuple[int, _Key] | None = None
        try:
            inode = _INODES.claim(self.path)
            conn = sqlite3.connect(
                _uri(self.path, "rwc"),
                uri=True,
                isolation_level=None,  # we issue BEGIN / COMMIT ourselves
                check_same_thread=False,  # used from worker threads, one at a time
                factory=self._factory,
            )
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    _create(conn, ledger_id)
                meta, version = _read_meta(conn, self.path)
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if meta["ledger_id"] != ledger_id:
                raise StorageError(
                    f"ledger file {self.path} belongs to ledger {meta['ledger_id']!r}, cannot "
                    f"open it as ledger {ledger_id!r}"
                )
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(
                    f"ledger file {self.path}: SQLite refused WAL journal mode (got {mode!r}); "
                    "is it on a filesystem without shared-memory support?"
                )
            conn.execute(f"PRAGMA synchronous = {self.durability.upper()}")
            if version < FORMAT_VERSION:
                _migrate(conn, self.path, version)
            length, head = _check_tail(conn, ledger_id)
            reader = sqlite3.connect(
                _uri(self.path, "ro"),
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                factory=self._factory,
            )
            reader.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        except BaseException:
            for opened in (reader, conn):
                if opened is not None:
                    opened.close()
            if inode is not None:
                _INODES.release(inode[1], inode[0])  # after SQLite closed: see _Inodes
            os.close(fd)  # closing the descriptor releases the flock
            raise
        self._lock_fd = fd
        self._inode = inode
        return conn, reader, length, head

    def _take_lock(self) -> int:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(
                f"cannot open ledger file {self.path}: cannot create its lock file "
                f"{self.lock_path} ({exc.strerror})"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"ledger file {self.path} is already open for writing (its lock "
                f"{self.lock_path} is held by another SQLiteStorage, in this process or "
                "another); a ledger file has one writer at a time"
            ) from exc
        return fd

    # -- head ------------------------------------------------------------------------------
    async def head(self) -> tuple[int, Hash]:
        """`(length, head hash)`; `(0, genesis(ledger_id))` for an empty ledger. A checkpoint.

        Served from memory (this storage is the only writer), except after a failed batch,
        when it is re-read from the file.

        Raises:
            StorageError: not open, or the file cannot be read.
        """
        conn = self._connection("read the head")
        if self._stale:
            assert self._ledger_id is not None
            self._length, self._head = await self._hop(
                "read the head", _read_head, conn, self._ledger_id
            )
            self._stale = False
        else:
            await trio.lowlevel.checkpoint()
        assert self._head is not None
        return self._length, self._head

    # -- append ----------------------------------------------------------------------------
    async def append(self, batch: StorageBatch) -> None:
        """Store a batch (entries, cursors, tree tiles, idempotency keys) as one transaction,
        durable (per `durability`) when this returns.

        One worker-thread hop for the whole batch. On any failure (disk full, I/O error) the
        transaction is rolled back: nothing of the batch is stored, and later batches work
        once the cause is gone.

        Cancellation: while waiting for the worker thread nothing is stored; once the thread
        runs, the batch commits (or fails) before the cancellation is delivered.

        Raises:
            StorageError: not open, the batch breaks a `check_batch` rule (seqs not contiguous
                with the head, ...), or SQLite failed (cause chained); nothing was stored.
        """
        conn = self._connection("append")
        if self._stale:
            await self.head()
        expected = self._length
        assert self._head is not None
        after = check_batch(batch, expected, self._head, backend=self)
        if batch.empty:
            await trio.lowlevel.checkpoint()
            return
        rows, cursors, tiles, keys = batch_rows(batch)
        tail = (expected - 1, bytes(self._head)) if expected else None
        try:
            await self._hop("append", self._append_sync, conn, tail, rows, cursors, tiles, keys)
        except StorageError:
            self._stale = True
            raise
        if rows:
            self._length = after
            self._head = batch.entries[-1].hash

    def _append_sync(
        self,
        conn: sqlite3.Connection,
        tail: tuple[int, bytes] | None,
        rows: list[tuple[int, bytes, bytes]],
        cursors: list[tuple[str, int]],
        tiles: list[tuple[int, int, bytes]],
        keys: list[tuple[str, str, int, int, int]],
    ) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            if rows:
                # We are the only writer, unless something got past the locks (or the file was
                # replaced under us): check, in the transaction, that the last row is the one
                # this storage wrote (an index lookup), so as never to extend another chain.
                found = conn.execute(_LAST).fetchone()
                if (None if found is None else (found[0], found[1])) != tail:
                    raise _Moved(tail, found)
                conn.executemany(_INSERT, rows)
            if cursors:
                conn.executemany(_UPSERT_CURSOR, cursors)
            if tiles:
                conn.executemany(_UPSERT_TILE, tiles)
            if keys:
                conn.executemany(_UPSERT_KEY, keys)
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (SQLITE_FULL, SQLITE_IOERR do): only roll back
            # a transaction that is still open.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    # -- capabilities ----------------------------------------------------------------------
    async def load_cursors(self) -> dict[str, int]:
        """Every stored cursor, module id -> highest seq processed.

        Cancellation: nothing to undo (the query in flight finishes in its thread first).

        Raises:
            StorageError: not open, or SQLite failed.
        """
        conn = self._reading("load cursors")

        def load() -> dict[str, int]:
            return {str(m): int(q) for m, q in conn.execute("SELECT module, seq FROM cursors")}

        return await self._read_hop("load cursors", load)

    async def read_tiles(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], TreeTile]:
        """The stored tiles among `keys` (`(level, index)` pairs); missing ones are absent.

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or SQLite failed. IntegrityError: a stored tile is not a
                whole number of 32-byte hashes.
        """
        conn = self._reading("read tree tiles")
        wanted = list(dict.fromkeys((int(level), int(index)) for level, index in keys))

        def load() -> list[tuple[int, int, Any]]:
            found: list[tuple[int, int, Any]] = []
            for level, index in wanted:
                row = conn.execute(
                    "SELECT hashes FROM tree_tiles WHERE level = ? AND idx = ?", (level, index)
                ).fetchone()
                if row is not None:
                    found.append((level, index, row[0]))
            return found

        return decode_tiles(
            await self._read_hop("read tree tiles", load), f"ledger file {self.path}"
        )

    async def get_idempotency(self, key: str) -> IdempotencyRecord | None:
        """The record stored under `key`, or None.

        Cancellation: nothing to undo.

        Raises:
            StorageError: not open, or SQLite failed.
        """
        conn = self._reading("look up an idempotency key")

        def load() -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                "SELECT key, fingerprint, first_seq, count, created FROM idempotency WHERE key = ?",
                (key,),
            ).fetchone()
            return row

        row = await self._read_hop("look up an idempotency key", load)
        if row is None:
            return None
        return IdempotencyRecord(
            key=row[0], fingerprint=row[1], first_seq=row[2], count=row[3], created=row[4]
        )

    async def prune_idempotency(self, created_before: int) -> int:
        """Delete the keys committed before `created_before` (UTC microseconds), in one
        transaction; return how many.

        Cancellation: once the thread runs, the delete commits before the cancellation is
        delivered.

        Raises:
            StorageError: not open, or SQLite failed (nothing deleted).
        """
        conn = self._connection("prune idempotency keys")

        def prune() -> int:
            try:
                conn.execute("BEGIN IMMEDIATE")
                count = conn.execute(
                    "DELETE FROM idempotency WHERE created < ?", (created_before,)
                ).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
            return int(count)

        return await self._hop("prune idempotency keys", prune)

    # -- read ------------------------------------------------------------------------------
    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries `start <= seq < stop` in seq order (`None`: up to the head at this call).

        Fetches bounded chunks (at most 512 rows or about 4 MiB each), one worker-thread hop
        per chunk on the read connection (never behind a commit), so memory stays bounded
        however long the ledger is. The iterator holds no
        resource between chunks: it may be abandoned at any point. Cancellation: nothing to
        undo (the chunk in flight finishes in its thread first).

        Raises:
            ValueError: bad range (at once). StorageError: not open (at once), closed while
                reading, or SQLite failed. IntegrityError: an entry cannot be decoded or is
                missing (naming its seq).
        """
        check_range(start, stop)
        conn = self._reading("read")
        end = self._length if stop is None else min(stop, self._length)

        async def fetch(first: int, last: int) -> list[_Row]:
            if self._reader is not conn:
                raise StorageError(f"cannot read: SQLiteStorage {self.path} was closed")
            return await self._read_hop("read", _fetch_chunk, conn, first, last)

        return _Entries(fetch, start, end)

    # -- close -----------------------------------------------------------------------------
    async def close(self) -> None:
        """Close both connections (merging the WAL into the file) and release the locks.
        Idempotent.

        Cancellation: shielded; the close always completes (it waits for a read chunk or batch
        in flight, then runs in a worker thread), so the locks are never left held.

        Raises:
            StorageError: SQLite reported an error while closing (the lock is released anyway).
        """
        conn, reader, fd, inode = self._conn, self._reader, self._lock_fd, self._inode
        if conn is None:
            await trio.lowlevel.checkpoint()
            return
        self._conn = self._reader = None
        self._lock_fd = self._inode = None

        def close_sync() -> None:
            try:
                conn.close()  # the last connection: SQLite checkpoints and removes the WAL
            finally:
                if inode is not None:
                    _INODES.release(inode[1], inode[0])  # only once SQLite has closed
                if fd is not None:
                    os.close(fd)

        with trio.CancelScope(shield=True):
            try:
                if reader is not None:  # waits for a read chunk in flight
                    await self._read_hop("close", reader.close)
            finally:
                await self._hop("close", close_sync)


def _read_head(conn: sqlite3.Connection, ledger_id: str) -> tuple[int, Hash]:
    row = conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return 0, genesis(ledger_id)
    seq, digest = row
    try:
        return seq + 1, Hash(digest)
    except (TypeError, ValueError) as exc:
        raise IntegrityError(f"entry {seq}: stored hash is not 32 bytes", seq=seq) from exc


def _check_tail(conn: sqlite3.Connection, ledger_id: str) -> tuple[int, Hash]:
    """`(length, head)` after checking seqs run from 0 and the last entry's chain hash."""
    tail = conn.execute(_TAIL).fetchall()
    if not tail:
        return 0, genesis(ledger_id)
    first = conn.execute("SELECT min(seq) FROM entries").fetchone()[0]
    return check_tail(ledger_id, tail, first, _entry)


async def verify_file(
    path: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None
) -> tuple[int, Hash]:
    """Verify a ledger file's whole chain without opening it for writing; `(length, head)`.

    Opens the file read-only (so it works beside a live writer, which it never blocks), reads
    the ledger id from its meta table, and streams every entry in bounded chunks through
    `ChainVerifier`, from the genesis of that ledger id. It verifies the entries present when
    it started (later appends by a live writer are not included). It reads every format
    version (1 to the current one) as it is, without migrating it.

    On a read-only directory or mount SQLite cannot create the `-shm` index a WAL reader
    needs: when there is no `-wal` file (or an empty one: no writer has uncommitted work
    outside the main file), the file is then opened as immutable (no locks, no `-shm`).

    Args:
        path: the ledger file.
        progress: called after each chunk with `(entries verified, total entries)`.

    Returns:
        `(length, head)`: the number of entries verified and the chain hash of the last one
        (the ledger's genesis hash if it is empty).

    Cancellation: nothing to undo; the connection is closed.

    Raises:
        StorageError: the file does not exist, is not a ledger file, or has an unknown format.
        IntegrityError: naming the seq of the first entry that does not verify.
    """
    where = _check_path(path)
    limiter = trio.CapacityLimiter(1)

    async def hop(what: str, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite ledger file {where}: {what} failed: {exc}") from exc

    def attempt(mode: str) -> tuple[sqlite3.Connection, str, int]:
        conn = sqlite3.connect(
            _uri(where, mode), uri=True, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            meta, _ = _read_meta(conn, where)  # the entries table is the same in every format
            last = conn.execute("SELECT max(seq) FROM entries").fetchone()[0]
        except BaseException:
            conn.close()
            raise
        return conn, meta["ledger_id"], 0 if last is None else int(last) + 1

    def open_sync() -> tuple[sqlite3.Connection, str, int]:
        if not where.is_file():
            raise StorageError(f"cannot verify ledger file {where}: no such file")
        try:
            return attempt("ro")
        except sqlite3.OperationalError:
            wal = where.with_name(where.name + "-wal")
            with contextlib.suppress(FileNotFoundError):
                if wal.stat().st_size:
                    raise  # committed work may live in the WAL: the file alone is not the ledger
            log.info("ledger file %s: cannot open it read-only; reading it as immutable", where)
            return attempt("ro&immutable=1")

    with _INODES.reading(where):
        conn, ledger_id, total = await hop("open", open_sync)
        try:

            async def fetch(first: int, last: int) -> list[_Row]:
                return await hop("read", _fetch_chunk, conn, first, last)

            verifier = await _verify_chain(ledger_id, total, fetch, progress)
        finally:
            with trio.CancelScope(shield=True):
                await hop("close", conn.close)
    return verifier.length, verifier.head
