"""Catch-up speed of a durable module from a SQLite ledger, against `ledger.read` in the same run.

Run: `python benchmarks/bench_catchup.py [--entries N]` (default 1,000,000; the issue's target
is a rate >= 0.6x the `read` rate).

1. Build a SQLite ledger of N entries (append_many batches of 1,000; not timed).
2. `read`: iterate `engine.read(0)` over the whole ledger (no modules), timed.
3. `catch-up`: reopen with a no-op durable module (no cursor yet, start_at="start") and time
   until its lag is 0 (an `ask` is answered once it caught up to the length at the ask).

`--lag N`: instead, 64 tasks append N records (memory storage) with and without a durable
module that is stalled until the appends are done (CATCH_UP overflow); prints both rates, their
ratio (target >= 0.9x), the RSS growth, and the time it takes the module to reach lag 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from nucleus_actors import Hash, LedgerConfig, LedgerEngine, Module, ModuleSpec, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage


class NoOp(Module):
    id = "noop"

    async def after_append(self, record: Record, hash: Hash) -> None:
        return None


async def main(entries: int) -> None:
    config = LedgerConfig(ledger_id="bench")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "l.db"
        async with open_ledger(config, storage=SQLiteStorage(path, durability="normal")) as led:
            for start in range(0, entries, 1000):
                count = min(1000, entries - start)
                await led.append_many([Record("k", {"n": start + i}) for i in range(count)])
        async with LedgerEngine(config, SQLiteStorage(path)) as engine:
            began = time.perf_counter()
            seen = 0
            async for _ in engine.read(0):
                seen += 1
            read_s = time.perf_counter() - began
        assert seen == entries
        began = time.perf_counter()
        async with open_ledger(
            config, storage=SQLiteStorage(path), modules=[ModuleSpec(NoOp(), durable=True)]
        ) as engine:
            handle = engine.modules.get("noop")
            await handle.ask(lambda m: None)
            catch_s = time.perf_counter() - began
            assert handle.status.lag == 0
            assert handle.status.cursor == entries - 1
    read_rate, catch_rate = entries / read_s, entries / catch_s
    print(f"entries                 {entries}")
    print(f"ledger.read             {read_rate:12,.0f} entries/s  ({read_s:.2f} s)")
    print(f"durable catch-up        {catch_rate:12,.0f} entries/s  ({catch_s:.2f} s)")
    print(f"ratio catch-up / read   {catch_rate / read_rate:.2f}x  (target >= 0.6x)")


class Stalled(Module):
    id = "stalled"

    def __init__(self) -> None:
        self.release = trio.Event()

    async def after_append(self, record: Record, hash: Hash) -> None:
        await self.release.wait()


async def lag(total: int) -> None:
    import resource

    async def run(with_module: bool) -> tuple[float, float, float]:
        module = Stalled()
        specs = [ModuleSpec(module, durable=True)] if with_module else []
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with open_ledger(LedgerConfig(ledger_id="lag"), modules=specs) as engine:
            began = time.perf_counter()

            async def writer(count: int) -> None:
                for n in range(count):
                    await engine.append(Record("k", {"n": n}))

            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(writer, total // 64)
            rate = (total // 64 * 64) / (time.perf_counter() - began)
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
            began = time.perf_counter()
            module.release.set()
            if with_module:
                handle = engine.modules.get("stalled")
                await handle.ask(lambda m: None)
                assert handle.status.lag == 0
            return rate, grown, time.perf_counter() - began

    without, grown_without, _ = await run(False)
    with_, grown_with, caught = await run(True)
    print(
        f"appends, 64 tasks, no module           {without:10,.0f}/s  (RSS +{grown_without:.1f} MB)"
    )
    print(f"appends, 64 tasks, stalled durable     {with_:10,.0f}/s  (RSS +{grown_with:.1f} MB)")
    print(f"ratio                                  {with_ / without:.2f}x  (target >= 0.9x)")
    print(f"catch-up to lag 0 once released        {caught:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--lag", type=int, default=0, help="run the lag benchmark instead")
    args = parser.parse_args()
    if args.lag:
        trio.run(lag, args.lag)
    else:
        trio.run(main, args.entries)
