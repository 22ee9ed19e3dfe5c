"""SQLiteStorage read latency while appends commit (and fsync) concurrently.

Run: python benchmarks/bench_read.py [--seconds 4] [--writers 16] [--dir DIR]

A ledger file is filled with `--fill` entries; then, for `--seconds`, `--writers` tasks append
one record at a time (durability "full": every commit is fsynced) while one reader task loops
over `get(seq)` of a random committed seq and `read(start, start + 256)` of a random range,
timing each call. The same reads are also timed with no writers, as the baseline. The table
shows latency percentiles in milliseconds per kind of read, and the appends/s the writers made.

Before storage contract v2 one connection (one `CapacityLimiter(1)`) served both reads and
commits, so a read waited for the commit (and its fsync) in front of it; with a separate read
connection it does not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import trio

from nucleus_actors import LedgerConfig, LedgerEngine, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _reader(
    ledger: LedgerEngine, stop_at: float, rng: random.Random
) -> tuple[list[float], list[float]]:
    gets: list[float] = []
    ranges: list[float] = []
    while time.perf_counter() < stop_at:
        length = ledger.state.length
        seq = rng.randrange(length)
        started = time.perf_counter()
        await ledger.get(seq)
        gets.append(time.perf_counter() - started)
        start = rng.randrange(max(1, length - 256))
        started = time.perf_counter()
        count = 0
        async for _ in ledger.read(start, start + 256):
            count += 1
        ranges.append(time.perf_counter() - started)
        assert count == min(256, length - start)
    return gets, ranges


async def scenario(path: Path, writers: int, seconds: float, fill: int) -> dict[str, float]:
    config = LedgerConfig(ledger_id="bench")
    async with open_ledger(config, storage=SQLiteStorage(path)) as ledger:
        while ledger.state.length < fill:
            await ledger.append_many([Record("fill", {"n": n}) for n in range(1000)])
        rng = random.Random(7)
        appended = 0
        stop_at = time.perf_counter() + seconds
        result: dict[str, float] = {}

        async def writer(w: int) -> None:
            nonlocal appended
            while time.perf_counter() < stop_at:
                await ledger.append(Record("w", {"w": w, "n": appended}))
                appended += 1

        async def read() -> None:
            gets, ranges = await _reader(ledger, stop_at, rng)
            for name, values in (("get", gets), ("read256", ranges)):
                result[f"{name} p50"] = 1000 * statistics.median(values)
                result[f"{name} p99"] = 1000 * _pct(values, 0.99)
                result[f"{name} max"] = 1000 * max(values)
                result[f"{name} n"] = len(values)

        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(writer, w)
            nursery.start_soon(read)
        result["appends/s"] = appended / seconds
    return result


async def main(seconds: float, writers: int, fill: int, directory: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        rows = []
        for label, count in (("no writers", 0), (f"{writers} writers", writers)):
            path = Path(tmp) / f"read-{count}.db"
            rows.append((label, await scenario(path, count, seconds, fill)))
    keys = [k for k in rows[0][1] if not k.endswith(" n")]
    print(f"{'scenario':<12}" + "".join(f"{k:>13}" for k in keys) + f"{'reads':>8}")
    for label, result in rows:
        cells = "".join(f"{result[k]:>13.2f}" for k in keys)
        print(f"{label:<12}{cells}{int(result['get n']):>8}")
    print("(latencies in ms; reads = get() calls timed, as many read(256) calls)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per scenario (default 4)")
    parser.add_argument("--writers", type=int, default=16, help="appending tasks (default 16)")
    parser.add_argument("--fill", type=int, default=5000, help="entries before measuring")
    parser.add_argument("--dir", type=Path, default=None, help="where the database goes")
    args = parser.parse_args()
    trio.run(main, args.seconds, args.writers, args.fill, args.dir)
