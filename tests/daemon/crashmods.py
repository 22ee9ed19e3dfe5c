"""Durable modules for the daemon kill -9 test (`use = "tests.daemon.crashmods:..."`).

Each writes every delivered seq to its own SQLite file (config `path`):

* `Exactly` owns its position (`resume_after` = the largest seq in its file): the seq is its
  effect and its position at once, one transaction, so the file must hold every seq exactly
  once, in order.
* `AtLeast` leaves the position to the runtime cursor: it inserts `(seq, pid, monotonic
  time)` per delivery, so a test can tell the runs (one daemon process each) apart and see
  which deliveries were repeated after a crash, and how many the module processed within
  one `cursor_interval`.
"""

from __future__ import annotations

import os
import sqlite3
import time

from nucleus_actors import Hash, Module, ModuleContext, Record


def _connect(path: str, schema: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")  # durable across kill -9 without an fsync each
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(schema)
    return db


class Exactly(Module):
    id = "exactly"

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None

    async def init(self, ctx: ModuleContext) -> None:
        self.db = _connect(ctx.config["path"], "CREATE TABLE IF NOT EXISTS seen (seq INTEGER)")

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        assert self.db is not None
        (last,) = self.db.execute("SELECT max(seq) FROM seen").fetchone()
        return None if last is None else int(last)

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert self.db is not None
        self.db.execute("INSERT INTO seen (seq) VALUES (?)", (record.seq,))

    async def stop(self, ctx: ModuleContext) -> None:
        if self.db is not None:
            self.db.close()


class AtLeast(Module):
    id = "atleast"

    def __init__(self) -> None:
        self.db: sqlite3.Connection | None = None
        self.pid = os.getpid()

    async def init(self, ctx: ModuleContext) -> None:
        self.db = _connect(
            ctx.config["path"], "CREATE TABLE IF NOT EXISTS seen (seq INTEGER, pid INTEGER, t REAL)"
        )

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert self.db is not None
        self.db.execute(
            "INSERT INTO seen (seq, pid, t) VALUES (?, ?, ?)",
            (record.seq, self.pid, time.monotonic()),
        )

    async def stop(self, ctx: ModuleContext) -> None:
        if self.db is not None:
            self.db.close()
