"""SQLiteStorage throughput, side by side with eventsourcing's SQLite application and raw sqlite3.

Run: python benchmarks/bench_sqlite.py [--repeat 5] [--dir DIR] [--profile SCENARIO]

Every scenario writes a fresh database file in a temporary directory on the real disk (`--dir`,
default the system temp dir; not a tmpfs, or fsync would be free). All databases use WAL with
`synchronous=FULL` (ours: `durability="full"`; eventsourcing's default is FULL too, checked and
printed). Scenarios run round-robin `--repeat` times and the table shows the median rate, so
the ratios compare figures measured in the same run under the same machine load.

Scenarios:
  ours: 1 task, append      one task appending one record at a time (one commit per record)
  ours: 64 tasks, append    64 tasks appending concurrently (the engine's group commit)
  ours: append_many(1000)   batches of 1,000 records (one commit per batch)
  eventsourcing: 1/save     eventsourcing SQLite application, one event per save()
  eventsourcing: 100/save   eventsourcing SQLite application, 100 events per save()
  ours: ..., no tree        the three scenarios above with `merkle_tree=False` (no Merkle tree
                            tiles kept): the tree's cost on appends (target <= 15 %)
  raw sqlite3 executemany   the same rows as ours (seq, canonical, hash), executemany batches of
                            100 in one transaction each, via trio.to_thread: the ceiling
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event

from nucleus_actors import LedgerConfig, Record, open_ledger
from nucleus_actors.hashing import canonical_bytes, chain_hash, genesis, leaf_hash
from nucleus_actors.storage import SQLiteStorage

SINGLE = 600  # appends by the one-task scenario
TASKS, PER_TASK = 64, 160  # 10,240 appends
MANY_BATCHES, MANY_SIZE = 12, 1000  # 12,000 records
ES_ONE = 600  # eventsourcing saves of one event
ES_BATCHES, ES_SIZE = 120, 100  # 12,000 events
RAW_BATCHES, RAW_SIZE = 120, 100  # 12,000 rows


def _payload(i: int) -> dict[str, Any]:
    return {"trick": f"trick-{i}", "n": i}


# -- ours ------------------------------------------------------------------------------------


def _config(tree: bool) -> LedgerConfig:
    # merkle_tree=False: the engine keeps no Merkle tree (the baseline of the tree's cost).
    return LedgerConfig(ledger_id="bench", merkle_tree=tree)


async def ours_single(path: Path, tree: bool = True) -> int:
    async with open_ledger(_config(tree), storage=SQLiteStorage(path)) as led:
        start = time.perf_counter()
        for i in range(SINGLE):
            await led.append(Record("dog.trick_added", _payload(i)))
        _elapsed.append(time.perf_counter() - start)
    return SINGLE


async def ours_concurrent(path: Path, tree: bool = True) -> int:
    async with open_ledger(_config(tree), storage=SQLiteStorage(path)) as led:

        async def task(t: int) -> None:
            for i in range(PER_TASK):
                await led.append(Record("dog.trick_added", _payload(t * PER_TASK + i)))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for t in range(TASKS):
                nursery.start_soon(task, t)
        _elapsed.append(time.perf_counter() - start)
    return TASKS * PER_TASK


async def ours_many(path: Path, tree: bool = True) -> int:
    async with open_ledger(_config(tree), storage=SQLiteStorage(path)) as led:
        start = time.perf_counter()
        for b in range(MANY_BATCHES):
            await led.append_many(
                [Record("dog.trick_added", _payload(b * MANY_SIZE + i)) for i in range(MANY_SIZE)]
            )
        _elapsed.append(time.perf_counter() - start)
    return MANY_BATCHES * MANY_SIZE


# -- eventsourcing ---------------------------------------------------------------------------


class Dog(Aggregate):
    @event("Registered")
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    @event("TrickAdded")
    def add_trick(self, trick: str, n: int) -> None:
        self.count += 1


def _es_app(path: Path) -> Application:
    return Application(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(path),
            "IS_SNAPSHOTTING_ENABLED": "n",
        }
    )


def es_synchronous(path: Path) -> int:
    app = _es_app(path)
    with app.recorder.datastore.transaction(commit=False) as cursor:  # type: ignore[attr-defined]
        cursor.execute("PRAGMA synchronous")
        value = int(cursor.fetchone()[0])
    app.close()
    return value


async def es_one(path: Path) -> int:
    app = _es_app(path)
    dog = Dog("fido")
    app.save(dog)
    start = time.perf_counter()
    for i in range(ES_ONE):
        dog.add_trick(**_payload(i))
        app.save(dog)
    _elapsed.append(time.perf_counter() - start)
    app.close()
    await trio.lowlevel.checkpoint()
    return ES_ONE


async def es_hundred(path: Path) -> int:
    app = _es_app(path)
    dog = Dog("fido")
    app.save(dog)
    start = time.perf_counter()
    for b in range(ES_BATCHES):
        for i in range(ES_SIZE):
            dog.add_trick(**_payload(b * ES_SIZE + i))
        app.save(dog)
    _elapsed.append(time.perf_counter() - start)
    app.close()
    await trio.lowlevel.checkpoint()
    return ES_BATCHES * ES_SIZE


# -- raw sqlite3 -----------------------------------------------------------------------------


def _rows(n: int) -> list[tuple[int, bytes, bytes]]:
    head = genesis("bench")
    rows = []
    for seq in range(n):
        record = Record("dog.trick_added", _payload(seq), seq=seq, timestamp=1_700_000_000_000_000)
        data = canonical_bytes(record)
        head = chain_hash(head, seq, leaf_hash(data))
        rows.append((seq, data, bytes(head)))
    return rows


async def raw(path: Path) -> int:
    rows = _rows(RAW_BATCHES * RAW_SIZE)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE entries "
        "(seq INTEGER PRIMARY KEY, canonical BLOB NOT NULL, hash BLOB NOT NULL)"
    )
    limiter = trio.CapacityLimiter(1)

    def write(batch: list[tuple[int, bytes, bytes]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO entries (seq, canonical, hash) VALUES (?, ?, ?)", batch)
        conn.execute("COMMIT")

    start = time.perf_counter()
    for b in range(RAW_BATCHES):
        await trio.to_thread.run_sync(
            write, rows[b * RAW_SIZE : (b + 1) * RAW_SIZE], limiter=limiter
        )
    _elapsed.append(time.perf_counter() - start)
    conn.close()
    return RAW_BATCHES * RAW_SIZE


# -- driver ----------------------------------------------------------------------------------

_elapsed: list[float] = []  # each scenario appends its timed section here

SCENARIOS: dict[str, Callable[[Path], Awaitable[int]]] = {
    "ours: 1 task, append": ours_single,
    "ours: 1 task, no tree": functools.partial(ours_single, tree=False),
    "ours: 64 tasks, append": ours_concurrent,
    "ours: 64 tasks, no tree": functools.partial(ours_concurrent, tree=False),
    "ours: append_many(1000)": ours_many,
    "ours: append_many, no tree": functools.partial(ours_many, tree=False),
    "eventsourcing: 1/save": es_one,
    "eventsourcing: 100/save": es_hundred,
    "raw sqlite3 executemany(100)": raw,
}
KEYS = {
    "single": "ours: 1 task, append",
    "concurrent": "ours: 64 tasks, append",
    "many": "ours: append_many(1000)",
    "single_notree": "ours: 1 task, no tree",
    "concurrent_notree": "ours: 64 tasks, no tree",
    "many_notree": "ours: append_many, no tree",
    "es1": "eventsourcing: 1/save",
    "es100": "eventsourcing: 100/save",
    "raw": "raw sqlite3 executemany(100)",
}


async def measure(name: str, directory: Path, run: int) -> float:
    path = directory / f"{run}-{name.split(':')[0].replace(' ', '_')}-{len(_elapsed)}.db"
    count = await SCENARIOS[name](path)
    rate = count / _elapsed[-1]
    for suffix in ("", "-wal", "-shm", ".lock"):
        await trio.Path(f"{path}{suffix}").unlink(missing_ok=True)
    return rate


async def main(repeat: int, directory: Path) -> None:
    rates: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    for run in range(repeat):
        for name in SCENARIOS:  # round-robin: every scenario sees the same machine load
            rates[name].append(await measure(name, directory, run))
    median = {name: statistics.median(values) for name, values in rates.items()}

    print(f"SQLite {sqlite3.sqlite_version}, WAL, synchronous=FULL; dir {directory}")
    print(f"eventsourcing synchronous pragma: {es_synchronous(directory / 'probe.db')} (2 = FULL)")
    print(f"median of {repeat} round-robin runs; records (events, rows) per second\n")
    print(f"{'scenario':<32}{'median/s':>12}{'min/s':>12}{'max/s':>12}")
    for name, values in rates.items():
        print(f"{name:<32}{median[name]:>12,.0f}{min(values):>12,.0f}{max(values):>12,.0f}")
    print()
    print(f"{'ratio':<58}{'measured':>10}{'target':>10}")
    checks = [
        ("64 tasks / 1 task (group commit)", "concurrent", "single", 5.0),
        ("64 tasks / eventsourcing 1 event per save", "concurrent", "es1", 6.0),
        ("append_many(1000) / eventsourcing 100 events per save", "many", "es100", 1.5),
        ("64 tasks / raw executemany(100) ceiling", "concurrent", "raw", None),
        ("append_many(1000) / raw executemany(100) ceiling", "many", "raw", None),
    ]
    for label, ours, theirs, target in checks:
        ratio = median[KEYS[ours]] / median[KEYS[theirs]]
        verdict = "" if target is None else (" ok" if ratio >= target else " MISSED")
        goal = "-" if target is None else f">= {target:g}x"
        print(f"{label:<58}{ratio:>9.2f}x{goal:>10}{verdict}")
    print("\ncost of keeping the Merkle tree (1 - with / without, medians; target <= 15 %):")
    for label, key in (("1 task", "single"), ("64 tasks", "concurrent"), ("append_many", "many")):
        on, off = median[KEYS[key]], median[KEYS[f"{key}_notree"]]
        cost = 100 * (1 - on / off)
        verdict = "ok" if cost <= 15 else "MISSED"
        print(f"  {label:<12}{on:>10,.0f}/s vs {off:>10,.0f}/s  cost {cost:5.1f} %  {verdict}")


async def profile(name: str, directory: Path) -> None:
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="enabled")
    with profiler:
        await measure(name, directory, 0)
    profiler.print(show_all=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="round-robin runs (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    parser.add_argument("--profile", choices=sorted(KEYS), help="profile one scenario instead")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench_sqlite-", dir=args.dir))
    try:
        if args.profile:
            trio.run(profile, KEYS[args.profile], directory)
        else:
            trio.run(main, args.repeat, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.sync()
