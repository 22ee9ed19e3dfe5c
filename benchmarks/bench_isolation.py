"""What isolation (`Isolation.PROCESS`) costs and buys, against the same modules as tasks.

Run: python benchmarks/bench_isolation.py [--seconds 2] [--rounds 3] [--starts 30]

Four measurements (issue 17), each with baseline and candidate alternating round by round in
one run (best round of each reported), so that a machine shared with other work skews both
alike:

1. **No-op module**: 64 tasks append one record at a time to a memory ledger with one module
   whose `after_append` does nothing; appends/s isolated vs task (target >= 0.5x: deliveries
   cross to the worker in batches).
2. **CPU-bound modules**: the same with two modules that each burn ~1 ms of pure-Python CPU
   per delivery; appends/s isolated vs task (target >= 1.4x), beside the ceiling: the same
   burn run by two bare Python processes at once vs one after the other.
3. **A blocking hook**: a module whose `after_append` blocks once for 3 s (`time.sleep`) with
   `timeout=0.5`, 16 appenders: the slowest append, isolated vs task (target <= 1.5 s
   isolated; as a task the stall detector reports it: `ModuleStatus.stalls`).
4. **Worker start**: time from `add` (and from a crash) to the module RUNNING, p50 / p99.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import time
from typing import Any

import trio

from nucleus_actors import (
    Hash,
    Isolation,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleContext,
    ModuleSpec,
    ModuleState,
    Record,
    open_ledger,
)

BURN_LOOPS = 20_000  # calibrated at start to ~1 ms


def burn(loops: int) -> int:
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


class Noop(Module):
    id = "noop"

    async def after_append(self, record: Record, hash: Hash) -> None:
        pass


class _Burner(Module):
    loops = BURN_LOOPS

    async def init(self, ctx: ModuleContext) -> None:
        self.loops = int(ctx.config.get("loops", BURN_LOOPS))

    async def after_append(self, record: Record, hash: Hash) -> None:
        burn(self.loops)


class BurnerA(_Burner):
    id = "burner-a"


class BurnerB(_Burner):
    id = "burner-b"


class Blocker(Module):
    """Blocks the first delivery of seq >= 200 for 3 s (once: only in incarnation 1)."""

    id = "blocker"

    async def init(self, ctx: ModuleContext) -> None:
        self.incarnation = ctx.incarnation

    async def after_append(self, record: Record, hash: Hash) -> None:
        if self.incarnation == 1 and record.seq == 200:
            time.sleep(3)  # noqa: ASYNC251 - the blocking call under test


class Starter(Module):
    id = "starter"


async def _appenders(ledger: LedgerEngine, tasks: int, seconds: float) -> tuple[int, list[float]]:
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []

    async def one() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await ledger.append(Record("bench", {"n": 1}))
            latencies.append(time.perf_counter() - started)

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(one)
    return len(latencies), latencies


async def throughput(specs: list[ModuleSpec[Any]], seconds: float) -> float:
    async with open_ledger(LedgerConfig(ledger_id="bench"), modules=specs) as ledger:
        await _appenders(ledger, 64, 0.2)  # warm up
        count, _ = await _appenders(ledger, 64, seconds)
    return count / seconds


async def blocking(isolation: Isolation) -> tuple[float, int, int]:
    """(slowest append s, restarts, stalls) with the 3 s blocker."""
    spec = ModuleSpec(Blocker, isolation=isolation, timeout=0.5)
    async with open_ledger(LedgerConfig(ledger_id="bench"), modules=[spec]) as ledger:
        for _ in range(150):
            await ledger.append(Record("bench", {}))
        _, latencies = await _appenders(ledger, 16, 4.5)
        status = ledger.modules.get("blocker").status
        if isolation is Isolation.PROCESS:
            with trio.fail_after(30):
                await ledger.modules.get("blocker").wait_state(ModuleState.RUNNING)
            status = ledger.modules.get("blocker").status
    return max(latencies), status.restarts, getattr(status, "stalls", 0)


async def starts(count: int) -> tuple[list[float], list[float]]:
    """Seconds from `add` to RUNNING, and from a crash (SIGKILL) to RUNNING again."""
    added: list[float] = []
    restarted: list[float] = []
    config = LedgerConfig(ledger_id="bench", max_restarts=10_000, restart_window=1.0)
    async with open_ledger(config) as ledger:
        for n in range(count):
            started = time.perf_counter()
            handle = await ledger.add(ModuleSpec(Starter, isolation=Isolation.PROCESS, id=f"s{n}"))
            added.append(time.perf_counter() - started)
            pid = handle.status.pid
            assert pid is not None
            started = time.perf_counter()
            os.kill(pid, 9)
            await handle.wait_state(ModuleState.RESTARTING)
            await handle.wait_state(ModuleState.RUNNING)
            restarted.append(time.perf_counter() - started)
            await ledger.terminate(handle.id)
            await ledger.remove(handle.id)
    return added, restarted


def _burn_for(loops: int, n: int, go: Any = None, out: Any = None) -> None:
    if go is not None:
        go.wait()
    started = time.perf_counter()
    for _ in range(n):
        burn(loops)
    if out is not None:
        out.put((started, time.perf_counter()))


def bare_processes(loops: int, n: int) -> float:
    """Speed-up of two bare processes burning at once over one process doing both's work
    (measured from the first one's start to the last one's end, process start-up excluded)."""
    ctx = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    _burn_for(loops, 2 * n)
    serial = time.perf_counter() - started
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_burn_for, args=(loops, n, go, out)) for _ in range(2)]
    for proc in procs:
        proc.start()
    time.sleep(1.0)  # both started (spawned, imported) and waiting
    go.set()
    spans = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    parallel = max(end for _, end in spans) - min(start for start, _ in spans)
    return serial / parallel


def calibrate() -> int:
    loops = 20_000
    started = time.perf_counter()
    for _ in range(50):
        burn(loops)
    per_call = (time.perf_counter() - started) / 50
    return max(1000, int(loops * 0.001 / per_call))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(seconds: float, rounds: int, count: int) -> None:
    logging.getLogger("nucleus_actors").setLevel(logging.CRITICAL)  # the crashes are on purpose
    loops = calibrate()
    print(f"cores: {os.cpu_count()}; burn: {loops} loops ~ 1 ms per delivery")
    task, process = Isolation.TASK, Isolation.PROCESS

    def noop(isolation: Isolation) -> list[ModuleSpec[Any]]:
        return [ModuleSpec(Noop, isolation=isolation)]

    def burners(isolation: Isolation) -> list[ModuleSpec[Any]]:
        return [
            ModuleSpec(cls, isolation=isolation, config={"loops": loops})
            for cls in (BurnerA, BurnerB)
        ]

    results: dict[str, list[float]] = {"noop task": [], "noop process": [],
                                       "cpu task": [], "cpu process": []}  # fmt: skip
    ceilings: list[float] = []
    for _ in range(rounds):  # interleaved: task, process, task, process, ...
        results["noop task"].append(await throughput(noop(task), seconds))
        results["noop process"].append(await throughput(noop(process), seconds))
        results["cpu task"].append(await throughput(burners(task), seconds))
        results["cpu process"].append(await throughput(burners(process), seconds))
        ceilings.append(bare_processes(loops, int(500 * seconds)))
    best = {name: max(values) for name, values in results.items()}
    print("\n1. no-op after_append module, 64 appending tasks (appends/s, best of rounds)")
    print(f"   task {best['noop task']:9.0f}   process {best['noop process']:9.0f}   "
          f"ratio {best['noop process'] / best['noop task']:.2f}x (target >= 0.5x)")  # fmt: skip
    print("2. two CPU-bound modules (~1 ms per delivery each), 64 appending tasks")
    print(f"   task {best['cpu task']:9.0f}   process {best['cpu process']:9.0f}   "
          f"ratio {best['cpu process'] / best['cpu task']:.2f}x (target >= 1.4x); "
          f"two bare processes: {max(ceilings):.2f}x (ceiling, same run)")  # fmt: skip
    print("   all rounds:", {k: [round(v) for v in vs] for k, vs in results.items()},
          "ceilings:", [round(c, 2) for c in ceilings])  # fmt: skip
    slow_task, _, stalls = await blocking(task)
    slow_process, restarts, _ = await blocking(process)
    print("3. after_append blocks once for 3 s, timeout=0.5, 16 appending tasks")
    print(f"   slowest append: task {slow_task:.2f} s (stalls reported: {stalls}), "
          f"process {slow_process:.2f} s (restarts: {restarts}; target <= 1.5 s)")  # fmt: skip
    added, restarted = await starts(count)
    print(f"4. worker start ({count} samples): add -> RUNNING p50 {_pct(added, 0.5) * 1000:.0f} ms"
          f" p99 {_pct(added, 0.99) * 1000:.0f} ms; crash -> RUNNING p50 "
          f"{_pct(restarted, 0.5) * 1000:.0f} ms p99 {_pct(restarted, 0.99) * 1000:.0f} ms "
          f"(mean {statistics.mean(added) * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=30)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.rounds, args.starts)
