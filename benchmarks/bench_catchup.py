"""Catch-up speed of a durable module from a SQLite ledger, against `ledger.read` in the same run.

Run: `python benchmarks/bench_catchup.py [--entries 1000000] [--rounds 3]` (the issue's target:
a catch-up rate >= 0.6x the `read` rate).

1. Build a SQLite ledger of N entries (`append_many` batches of 1,000; not timed).
2. Open it once (`durability="normal"`), then for each round, alternating:
   * `read`: iterate `engine.read(0)` over the whole ledger;
   * `catch-up`: `engine.add` a no-op durable module (a new id each round: no cursor,
     `start_at="start"`) and time until it has caught up (an `ask`, answered once it reached
     the length at the ask), then remove it.
   Both go through the storage's read path: SQLite's read-only connection (`SQLiteStorage`
   reads never queue behind commits).

Prints the best and the median of the rounds for both, and the ratio of the medians. For the
append rate with a stalled durable module, see `bench_lag.py`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import trio

from nucleus_actors import Hash, LedgerConfig, LedgerEngine, Module, ModuleSpec, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage


class NoOp(Module):
    def __init__(self, module_id: str) -> None:
        self.id = module_id

    async def after_append(self, record: Record, hash: Hash) -> None:
        return None


async def _noop(module: Module) -> None:
    return None


async def main(entries: int, rounds: int) -> None:
    config = LedgerConfig(ledger_id="bench")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "l.db"
        began = time.perf_counter()
        async with open_ledger(config, storage=SQLiteStorage(path, durability="normal")) as led:
            for start in range(0, entries, 1000):
                count = min(1000, entries - start)
                await led.append_many([Record("k", {"n": start + i}) for i in range(count)])
        print(f"built {entries} entries in {time.perf_counter() - began:.1f} s", flush=True)
        reads: list[float] = []
        catch_ups: list[float] = []
        async with LedgerEngine(config, SQLiteStorage(path, durability="normal")) as engine:
            await engine.init_all()
            await engine.start_all()
            for n in range(rounds):
                began = time.perf_counter()
                seen = 0
                async for _ in engine.read(0):
                    seen += 1
                reads.append(entries / (time.perf_counter() - began))
                assert seen == entries
                module_id = f"noop-{n}"
                began = time.perf_counter()
                handle = await engine.add(ModuleSpec(NoOp(module_id), durable=True))
                await handle.ask(_noop)
                catch_ups.append(entries / (time.perf_counter() - began))
                status = handle.status
                assert (status.lag, status.cursor) == (0, entries - 1), status
                await engine.terminate(module_id)
                await engine.remove(module_id)
                print(
                    f"round {n + 1}: read {reads[-1]:,.0f} entries/s, "
                    f"catch-up {catch_ups[-1]:,.0f} entries/s",
                    flush=True,
                )
    read_rate, catch_rate = statistics.median(reads), statistics.median(catch_ups)
    print(f"entries                 {entries}")
    for name, rate, best in (
        ("ledger.read", read_rate, max(reads)),
        ("durable catch-up", catch_rate, max(catch_ups)),
    ):
        print(f"{name:22}  median {rate:12,.0f} entries/s  best {best:12,.0f}")
    print(f"ratio catch-up / read   {catch_rate / read_rate:.2f}x medians, "
          f"{max(catch_ups) / max(reads):.2f}x bests  (target >= 0.6x)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.entries, args.rounds)
