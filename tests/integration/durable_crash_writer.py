"""Append to a SQLite ledger forever with two durable modules; the crash test SIGKILLs it.

Usage: python durable_crash_writer.py LEDGER_FILE DIR

Modules (each writes every delivered seq to its own SQLite file in DIR):
* `exactly` owns its position (`resume_after`): seq and position in one transaction of
  `exactly.db`, so every seq must be there exactly once.
* `atleast` uses the runtime cursor: it inserts each delivered seq into `atleast.db` with the
  run number; every seq must be there at least once.

Each receipt is printed as `<seq>` after `append` returned (it is acknowledged).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import trio

from nucleus_actors import (
    Hash,
    LedgerConfig,
    Module,
    ModuleContext,
    ModuleSpec,
    Record,
    open_ledger,
)
from nucleus_actors.storage import SQLiteStorage


class Exactly(Module):
    id = "exactly"

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER NOT NULL)")

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        (last,) = self.db.execute("SELECT max(seq) FROM seen").fetchone()
        return None if last is None else int(last)

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.db.execute("INSERT INTO seen (seq) VALUES (?)", (record.seq,))


class AtLeast(Module):
    id = "atleast"

    def __init__(self, path: Path, run: int) -> None:
        self.run = run
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER NOT NULL, run INTEGER)")

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.db.execute("INSERT INTO seen (seq, run) VALUES (?, ?)", (record.seq, self.run))


def modules(directory: Path, run: int) -> list[ModuleSpec[Module]]:
    return [
        ModuleSpec(Exactly(directory / "exactly.db"), durable=True, inbox=16),
        ModuleSpec(AtLeast(directory / "atleast.db", run), durable=True, inbox=16),
    ]


async def main(path: str, directory: str, run: int) -> None:
    storage = SQLiteStorage(path)
    config = LedgerConfig(ledger_id="crash", cursor_interval=0.05)
    async with open_ledger(
        config, storage=storage, modules=modules(Path(directory), run)
    ) as ledger:
        print(f"open {ledger.state.length}", flush=True)

        async def writer(n: int) -> None:
            i = 0
            while True:
                i += 1
                receipt = await ledger.append(Record("crash.one", {"w": n, "i": i}))
                sys.stdout.write(f"{receipt.seq}\n")
                sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(writer, n)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
