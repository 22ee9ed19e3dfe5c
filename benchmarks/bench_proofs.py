"""Merkle proofs: latency on a large SQLite ledger, the tree's cost on appends, proof sizes.

Run: python benchmarks/bench_proofs.py [--entries 1000000] [--requests 1000] [--rounds 3]
     [--dir DIR] [--reuse FILE] [--skip-throughput]

1. Builds a SQLite ledger of `--entries` entries through the engine (append_many batches of
   1,000, so the tree tiles are kept as in production), or reuses `--reuse FILE`.
2. Proof latency through the engine, `--requests` random inclusion proofs and as many random
   consistency proofs (each at a random size), with the ledger idle, then while 64 tasks
   append; and the same requests through the HTTP app (FastAPI over httpx's ASGI transport, in
   process: no sockets), idle. Prints p50/p99/max in milliseconds.
3. Append throughput with and without the tree (`LedgerConfig.merkle_tree`), memory and SQLite,
   scenarios interleaved over `--rounds` rounds in the same run; prints the median rates and
   the cost of the tree in percent.
4. Proof sizes at the ledger's size: hashes and bytes (raw and as JSON).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from nucleus_actors import LedgerConfig, LedgerEngine, Record, open_ledger
from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBackend

LEDGER = "bench"


def _record(i: int) -> Record:
    return Record("bench.event", {"n": i, "who": f"user-{i % 977}"})


async def build(path: Path, entries: int) -> float:
    started = time.perf_counter()
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=SQLiteStorage(path)) as led:
        have = led.state.length
        last = time.perf_counter()
        while have < entries:
            step = min(1000, entries - have)
            await led.append_many([_record(have + i) for i in range(step)])
            have += step
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(f"  built {have:,}/{entries:,} entries")
    return time.perf_counter() - started


def _pct(samples: list[float]) -> str:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000

    return f"p50 {at(0.5):6.2f} ms  p99 {at(0.99):6.2f} ms  max {ordered[-1] * 1000:6.2f} ms"


async def _time_requests(
    requests: list[Callable[[], Awaitable[Any]]],
) -> list[float]:
    samples = []
    for request in requests:
        t0 = time.perf_counter()
        await request()
        samples.append(time.perf_counter() - t0)
    return samples


def _requests(engine: LedgerEngine, n: int, count: int, rng: random.Random) -> dict[str, list[Any]]:
    inclusion, consistency = [], []
    for _ in range(count):
        size = rng.randint(1, n)
        seq = rng.randrange(size)
        inclusion.append(lambda seq=seq, size=size: engine.inclusion_proof(seq, size))
        new = rng.randint(1, n)
        old = rng.randint(1, new)
        consistency.append(lambda old=old, new=new: engine.consistency_proof(old, new))
    return {"inclusion": inclusion, "consistency": consistency}


async def latency(path: Path, count: int) -> None:
    rng = random.Random(1962)
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=SQLiteStorage(path)) as led:
        n = led.state.length
        print(f"\nproof latency on a SQLite ledger of {n:,} entries ({count} requests each)")
        for kind, requests in _requests(led, n, count, rng).items():
            print(f"  engine, idle,        {kind:<11}  {_pct(await _time_requests(requests))}")
        stop = trio.Event()
        appended = 0

        async def appender(k: int) -> None:
            nonlocal appended
            i = 0
            while not stop.is_set():
                await led.append(_record(k * 1_000_000 + i))
                appended += 1
                i += 1

        for kind, requests in _requests(led, n, count, rng).items():
            async with trio.open_nursery() as nursery:
                for k in range(64):
                    nursery.start_soon(appender, k)
                await trio.sleep(0.2)
                t0 = time.perf_counter()
                before = appended
                samples = await _time_requests(requests)
                rate = (appended - before) / (time.perf_counter() - t0)
                stop.set()
            stop = trio.Event()
            print(
                f"  engine, 64 appenders, {kind:<10}  {_pct(samples)}  "
                f"(appends meanwhile: {rate:,.0f}/s)"
            )
        await _http_latency(led, count, rng)


async def _http_latency(led: LedgerEngine, count: int, rng: random.Random) -> None:
    from nucleus_actors.daemon import DaemonState, LedgerHost, create_app, parse_config

    settings = parse_config(
        {"ledgers": [{"id": LEDGER, "storage": ":memory:"}]}, base_dir=Path(".")
    ).ledgers[0]
    host = LedgerHost(settings, led, None)
    host.serving = True
    app = create_app(DaemonState({LEDGER: host}, token=None, max_body_bytes=1 << 20))
    n = led.state.length
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://bench"
    ) as api:
        for kind in ("inclusion", "consistency"):
            samples = []
            for _ in range(count):
                if kind == "inclusion":
                    size = rng.randint(1, n)
                    params = {"seq": rng.randrange(size), "size": size}
                else:
                    new = rng.randint(1, n)
                    params = {"from": rng.randint(1, new), "to": new}
                t0 = time.perf_counter()
                response = await api.get(f"/v1/ledgers/{LEDGER}/proof/{kind}", params=params)
                samples.append(time.perf_counter() - t0)
                assert response.status_code == 200, response.text
            print(f"  HTTP (ASGI), idle,   {kind:<11}  {_pct(samples)}")


async def sizes(path: Path) -> None:
    import json

    rng = random.Random(7)
    async with open_ledger(LedgerConfig(ledger_id=LEDGER), storage=SQLiteStorage(path)) as led:
        n = led.state.length
        inc = [len((await led.inclusion_proof(rng.randrange(n))).path) for _ in range(2000)]
        con = [len((await led.consistency_proof(rng.randint(1, n))).path) for _ in range(2000)]
        last = await led.inclusion_proof(n - 1)
        wire = len(json.dumps(last.to_json()))
    bound = math.ceil(math.log2(n)) if n > 1 else 0
    print(f"\nproof sizes at n = {n:,} (ceil(log2 n) = {bound}):")
    print(
        f"  inclusion:   max {max(inc)} hashes = {32 * max(inc)} bytes, mean "
        f"{statistics.mean(inc):.1f} hashes (2,000 random seqs); JSON of one: ~{wire} bytes"
    )
    print(
        f"  consistency: max {max(con)} hashes = {32 * max(con)} bytes, mean "
        f"{statistics.mean(con):.1f} hashes (2,000 random old sizes to n)"
    )


# -- the tree's cost on appends ----------------------------------------------------------------

TASKS, PER_TASK = 64, 100


async def _appends(storage: StorageBackend, tree: bool, mode: str) -> float:
    config = LedgerConfig(ledger_id=LEDGER, merkle_tree=tree)
    async with open_ledger(config, storage=storage) as led:
        start = time.perf_counter()
        if mode == "64 tasks":

            async def worker(k: int) -> None:
                for i in range(PER_TASK):
                    await led.append(_record(k * PER_TASK + i))

            async with trio.open_nursery() as nursery:
                for k in range(TASKS):
                    nursery.start_soon(worker, k)
            count = TASKS * PER_TASK
        elif mode == "1 task":
            count = 400
            for i in range(count):
                await led.append(_record(i))
        else:  # append_many(1000)
            count = 10_000
            for b in range(count // 1000):
                await led.append_many([_record(b * 1000 + i) for i in range(1000)])
        return count / (time.perf_counter() - start)


async def throughput(rounds: int, directory: Path) -> None:
    scenarios = [
        ("memory", "64 tasks"),
        ("memory", "append_many(1000)"),
        ("sqlite", "64 tasks"),
        ("sqlite", "1 task"),
        ("sqlite", "append_many(1000)"),
    ]
    rates: dict[tuple[str, str, bool], list[float]] = {}
    for r in range(rounds):
        for kind, mode in scenarios:
            for tree in (True, False) if r % 2 == 0 else (False, True):
                if kind == "memory":
                    storage: StorageBackend = MemoryStorage()
                else:
                    storage = SQLiteStorage(directory / f"t-{r}-{mode[:2]}-{tree}.db")
                rate = await _appends(storage, tree, mode)
                rates.setdefault((kind, mode, tree), []).append(rate)
    print(f"\nappend throughput with and without the tree (median of {rounds} rounds):")
    for kind, mode in scenarios:
        on = statistics.median(rates[(kind, mode, True)])
        off = statistics.median(rates[(kind, mode, False)])
        print(
            f"  {kind:<6} {mode:<18} tree {on:9,.0f}/s   no tree {off:9,.0f}/s   "
            f"cost {100 * (1 - on / off):5.1f} %"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--reuse", type=Path, default=None)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        path = args.reuse or directory / "big.db"
        if args.reuse is None or not path.exists():
            print(f"building a SQLite ledger of {args.entries:,} entries in {path} ...")
            took = await build(path, args.entries)
            print(f"  built in {took:.1f} s ({args.entries / took:,.0f} entries/s)")
        await latency(path, args.requests)
        await sizes(path)
        if not args.skip_throughput:
            await throughput(args.rounds, directory)


if __name__ == "__main__":
    trio.run(main)
