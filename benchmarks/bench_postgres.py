"""PostgresStorage throughput: concurrency, batch appends against a raw COPY ceiling, failover.

Run: python benchmarks/bench_postgres.py [--dsn DSN] [--rounds 5] [--failover-report FILE]

Everything runs against one PostgreSQL server (default: the test server,
postgresql://postgres@127.0.0.1:5432/test), in schemas created for the run and dropped after.
Scenarios alternate round by round (baseline and candidate interleaved); the table shows the
median and best of the rounds.

* serial vs 64 concurrent appenders: `append(record)` one at a time from one task, then from
  64 tasks at once, through the same engine and backend (group commit: one transaction per
  batch). Target: >= 5x.
* `append_many(1000)` with no modules, vs the raw ceiling: psycopg `COPY ... FROM STDIN
  (FORMAT BINARY)` of 1000 rows of the same shape and size (seq, canonical bytes, hash) in one
  transaction, from the same thread layout (one `trio.to_thread.run_sync` hop under a
  `CapacityLimiter(1)` per batch). Target: >= 0.5x. Also with three no-op modules (stated),
  and the same 10 batches from 2 concurrent callers (one batch queues while the other is
  written; the pipeline still takes them one at a time: docs/performance.md says why).
* failover time (kill -9 of the writer to the first append acknowledged by the new writer):
  read from the JSON the failover test writes (`NUCLEUS_FAILOVER_REPORT=FILE pytest
  tests/postgres/test_failover.py -k kill`), given as `--failover-report FILE`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import trio

from nucleus_actors import (
    Hash,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleSpec,
    Record,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage, PostgresStorage, StorageBatch
from nucleus_actors.testing import make_entries

DSN = "postgresql://postgres@127.0.0.1:5432/test"
PAYLOAD = "x" * 100


class NoOp(Module):
    async def after_append(self, record: Record, hash: Hash) -> None:
        return None


def _modules() -> list[ModuleSpec[Any]]:
    return [ModuleSpec(NoOp, id=f"noop{index}") for index in range(3)]


def _drop(dsn: str, schemas: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def _engine_rate(
    dsn: str, schema: str, work: Callable[[LedgerEngine], Awaitable[int]], modules: bool = False
) -> float:
    """Records per second `work(engine)` appends (it returns how many)."""
    config = LedgerConfig(ledger_id="bench")
    storage = PostgresStorage(dsn, schema=schema, lease_timeout=30)
    async with open_ledger(config, storage=storage, modules=_modules() if modules else ()) as led:
        await led.append(Record("warm", {"n": 0}))
        started = time.perf_counter()
        count = await work(led)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def serial(engine: LedgerEngine, total: int = 400) -> int:
    for n in range(total):
        await engine.append(Record("k", {"n": n, "text": PAYLOAD}))
    return total


async def concurrent(engine: LedgerEngine, tasks: int = 64, each: int = 40) -> int:
    async def one(t: int) -> None:
        for n in range(each):
            await engine.append(Record("k", {"t": t, "n": n, "text": PAYLOAD}))

    async with trio.open_nursery() as nursery:
        for t in range(tasks):
            nursery.start_soon(one, t)
    return tasks * each


BATCHES = [[Record("k", {"b": b, "n": n, "text": PAYLOAD}) for n in range(1000)] for b in range(10)]


async def batches(engine: LedgerEngine) -> int:
    """10 x append_many(1000) of records made before the clock starts (as the raw rows are)."""
    for records in BATCHES:
        await engine.append_many(records)
    return sum(map(len, BATCHES))


async def two_callers(engine: LedgerEngine) -> int:
    """The same 10 batches from 2 tasks (5 each): one batch queues while the other is stored."""

    async def caller(start: int) -> None:
        for records in BATCHES[start::2]:
            await engine.append_many(records)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller, 0)
        nursery.start_soon(caller, 1)
    return sum(map(len, BATCHES))


async def memory_batches() -> float:
    """The engine's own ceiling: the same batches on MemoryStorage (no I/O at all)."""
    async with open_ledger(LedgerConfig(ledger_id="bench"), storage=MemoryStorage()) as led:
        started = time.perf_counter()
        count = await batches(led)
        return count / (time.perf_counter() - started)


async def raw_copy(dsn: str, schema: str, count: int = 10, size: int = 1000) -> float:
    """Rows per second of the raw ceiling: one COPY of `size` rows per transaction."""
    entries = make_entries("bench", 0, count * size)
    rows = [(e.seq, e.canonical + PAYLOAD.encode(), bytes(e.hash)) for e in entries]
    limiter = trio.CapacityLimiter(1)
    conn = await trio.to_thread.run_sync(lambda: psycopg.connect(dsn, autocommit=True))
    try:

        def setup() -> None:
            conn.execute(f'CREATE SCHEMA "{schema}"')
            conn.execute(
                f'CREATE TABLE "{schema}".entries (seq bigint PRIMARY KEY, '
                "canonical bytea NOT NULL, hash bytea NOT NULL)"
            )

        await trio.to_thread.run_sync(setup, limiter=limiter)

        def write(chunk: list[tuple[int, bytes, bytes]]) -> None:
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy(
                    f'COPY "{schema}".entries (seq, canonical, hash) FROM STDIN (FORMAT BINARY)'
                ) as copy,
            ):
                copy.set_types(["int8", "bytea", "bytea"])
                for row in chunk:
                    copy.write_row(row)

        started = time.perf_counter()
        for b in range(count):
            await trio.to_thread.run_sync(write, rows[b * size : (b + 1) * size], limiter=limiter)
        elapsed = time.perf_counter() - started
    finally:
        await trio.to_thread.run_sync(conn.close)
    return count * size / elapsed


async def storage_batches(dsn: str, schema: str, count: int = 10, size: int = 1000) -> float:
    """Rows per second of `PostgresStorage.append` alone: batches of `size` entries built
    (hashed) before the clock starts: the backend's share of append_many."""
    entries = make_entries("bench", 0, count * size)
    storage = PostgresStorage(dsn, schema=schema, lease_timeout=30)
    await storage.open("bench")
    try:
        started = time.perf_counter()
        for b in range(count):
            await storage.append(StorageBatch(entries=entries[b * size : (b + 1) * size]))
        return count * size / (time.perf_counter() - started)
    finally:
        await storage.close()


async def main(dsn: str, rounds: int, report: Path | None) -> None:
    results: dict[str, list[float]] = {}
    schemas: list[str] = []

    def fresh() -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        schemas.append(name)
        return name

    scenarios: list[tuple[str, Callable[[], Awaitable[float]]]] = [
        ("serial append", lambda: _engine_rate(dsn, fresh(), serial)),
        ("64 concurrent appenders", lambda: _engine_rate(dsn, fresh(), concurrent)),
        ("raw COPY 1000/txn", lambda: raw_copy(dsn, fresh())),
        ("PostgresStorage.append(1000 built)", lambda: storage_batches(dsn, fresh())),
        ("append_many(1000)", lambda: _engine_rate(dsn, fresh(), batches)),
        ("append_many(1000), 3 no-op modules", lambda: _engine_rate(dsn, fresh(), batches, True)),
        ("append_many(1000), 2 callers", lambda: _engine_rate(dsn, fresh(), two_callers)),
        (
            "append_many(1000), 2 callers, 3 no-op",
            lambda: _engine_rate(dsn, fresh(), two_callers, True),
        ),
        ("append_many(1000) on MemoryStorage", memory_batches),
    ]
    try:
        for _ in range(rounds):
            for name, run in scenarios:  # interleaved: every scenario once per round
                results.setdefault(name, []).append(await run())
                await trio.to_thread.run_sync(_drop, dsn, schemas)
                schemas.clear()
    finally:
        await trio.to_thread.run_sync(_drop, dsn, schemas)
    print(f"{'scenario':<38}{'median/s':>12}{'best/s':>12}")
    for name, values in results.items():
        print(f"{name:<38}{statistics.median(values):>12.0f}{max(values):>12.0f}")
    med = {name: statistics.median(values) for name, values in results.items()}
    conc = med["64 concurrent appenders"] / med["serial append"]
    batch = med["append_many(1000)"] / med["raw COPY 1000/txn"]
    mods = med["append_many(1000), 3 no-op modules"] / med["raw COPY 1000/txn"]
    print(f"\n64 concurrent / serial: {conc:.1f}x (target >= 5x)")
    print(f"append_many(1000) / raw COPY: {batch:.2f}x (target >= 0.5x)")
    print(f"append_many(1000) with 3 no-op modules / raw COPY: {mods:.2f}x")
    backend = med["PostgresStorage.append(1000 built)"] / med["raw COPY 1000/txn"]
    print(f"PostgresStorage.append of 1000 built entries / raw COPY: {backend:.2f}x")
    two = med["append_many(1000), 2 callers"] / med["raw COPY 1000/txn"]
    two_mods = med["append_many(1000), 2 callers, 3 no-op"] / med["raw COPY 1000/txn"]
    print(f"append_many(1000) from 2 callers / raw COPY: {two:.2f}x (3 no-op: {two_mods:.2f}x)")
    memory = med["append_many(1000)"] / med["append_many(1000) on MemoryStorage"]
    print(f"append_many(1000) on PostgreSQL / on MemoryStorage (engine CPU bound): {memory:.2f}x")
    text = None if report is None else await trio.Path(report).read_text()
    if text:
        data: dict[str, Any] = json.loads(text)
        print(
            f"failover (kill -9 -> first acknowledged append on the new writer), "
            f"{data['rounds']} rounds, lease_timeout {data['lease_timeout']} s: "
            f"p50 {data['failover_p50']:.2f} s, max {data['failover_max']:.2f} s"
        )
    else:
        print("failover: run the failover test with NUCLEUS_FAILOVER_REPORT (see the docstring)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=DSN, help=f"PostgreSQL to use (default {DSN})")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--failover-report", type=Path, default=None)
    args = parser.parse_args()
    trio.run(main, args.dsn, args.rounds, args.failover_report)
