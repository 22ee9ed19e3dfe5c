"""The asyncio bridge (`nucleus_actors.aio`) against trio itself, in the same run.

Run: `python benchmarks/bench_aio.py [--quick]`.

Every ledger uses memory storage and 3 modules with no-op before_append + after_append.

  trio: 64 tasks          64 trio tasks appending concurrently to `open_ledger` (the baseline)
  aio thread: 64 tasks    64 asyncio tasks appending through `aio.open_ledger` (the design we
                          ship: the ledger on its own trio thread)     (target >= 0.5x trio)
  aio guest: 64 tasks     the same through trio guest mode on the asyncio loop (the other
                          design, measured to choose; `_guest=True` is private)
  latency                 one task appending one record at a time: p50/p99 per append for
                          trio, and the overhead the bridge adds to it (thread and guest)

Rates are the median of the repetitions; each repetition opens a fresh ledger. Also printed:
calls per host->trio crossing and per trio->host crossing (the batching of the thread hop).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import trio

from nucleus_actors import Hash, LedgerConfig, Module, Record, aio, open_ledger

TASKS = 64


class NoOp(Module):
    """A module with no-op before_append and after_append."""

    def __init__(self, module_id: str) -> None:
        self.id = module_id

    async def before_append(self, record: Record) -> Record | None:
        return None

    async def after_append(self, record: Record, hash: Hash) -> None:
        return None


def _modules() -> list[Module]:
    return [NoOp(f"noop-{i}") for i in range(3)]


def _records(n: int) -> list[Record]:
    return [Record("order.created", {"order": i, "customer": "c-17"}) for i in range(n)]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


# -- trio ------------------------------------------------------------------------------------


async def trio_concurrent(per_task: int) -> float:
    records = _records(TASKS * per_task)
    async with open_ledger(LedgerConfig(ledger_id="bench"), modules=_modules()) as engine:

        async def worker(k: int) -> None:
            for record in records[k * per_task : (k + 1) * per_task]:
                await engine.append(record)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in range(TASKS):
                nursery.start_soon(worker, k)
        return len(records) / (time.perf_counter() - start)


async def trio_latency(n: int) -> list[float]:
    records = _records(n)
    samples = []
    async with open_ledger(LedgerConfig(ledger_id="bench"), modules=_modules()) as engine:
        for record in records:
            start = time.perf_counter()
            await engine.append(record)
            samples.append(time.perf_counter() - start)
    return samples


# -- asyncio through the bridge -------------------------------------------------------------


async def aio_concurrent(per_task: int, guest: bool) -> tuple[float, float, float]:
    records = _records(TASKS * per_task)
    opened = aio.open_ledger(LedgerConfig(ledger_id="bench"), modules=_modules(), _guest=guest)
    async with opened as ledger:

        async def worker(k: int) -> None:
            for record in records[k * per_task : (k + 1) * per_task]:
                await ledger.append(record)

        bridge = ledger._bridge
        calls, crossings, returns = bridge.calls, bridge.crossings, bridge.returns
        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(TASKS)))
        rate = len(records) / (time.perf_counter() - start)
        per_crossing = (bridge.calls - calls) / max(1, bridge.crossings - crossings)
        per_return = (bridge.calls - calls) / max(1, bridge.returns - returns)
    return rate, per_crossing, per_return


async def aio_latency(n: int, guest: bool) -> list[float]:
    records = _records(n)
    samples = []
    opened = aio.open_ledger(LedgerConfig(ledger_id="bench"), modules=_modules(), _guest=guest)
    async with opened as ledger:
        for record in records:
            start = time.perf_counter()
            await ledger.append(record)
            samples.append(time.perf_counter() - start)
    return samples


def _median(fn: Callable[[], float], repeat: int) -> float:
    return statistics.median(fn() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer appends (a smoke run)")
    args = parser.parse_args()
    per_task, latency_n, repeat = (20, 300, 3) if args.quick else (100, 2000, 5)

    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {}
    # Interleave the designs in each repetition so that load on the machine hits all alike.
    trio_rates, thread_rates, guest_rates = [], [], []
    thread_batching: list[tuple[float, float]] = []
    for _ in range(repeat):
        trio_rates.append(trio.run(trio_concurrent, per_task))
        rate, per_in, per_out = asyncio.run(aio_concurrent(per_task, False))
        thread_rates.append(rate)
        thread_batching.append((per_in, per_out))
        guest_rates.append(asyncio.run(aio_concurrent(per_task, True))[0])
    base = statistics.median(trio_rates)
    for name, rates in (
        ("trio: 64 tasks", trio_rates),
        ("aio thread: 64 tasks", thread_rates),
        ("aio guest: 64 tasks", guest_rates),
    ):
        rate = statistics.median(rates)
        results[name] = rate
        rows.append((name, f"{rate:,.0f} appends/s", f"{rate / base:.2f}x trio"))
    per_in = statistics.median(b[0] for b in thread_batching)
    per_out = statistics.median(b[1] for b in thread_batching)
    rows.append(("aio thread: batching", f"{per_in:.1f} calls/crossing in", f"{per_out:.1f} out"))

    trio_samples = trio.run(trio_latency, latency_n)
    thread_samples = asyncio.run(aio_latency(latency_n, False))
    guest_samples = asyncio.run(aio_latency(latency_n, True))
    t50, t99 = _percentiles(trio_samples)
    rows.append(("latency trio", f"p50 {t50 * 1e6:.0f} us", f"p99 {t99 * 1e6:.0f} us"))
    for name, samples in (("thread", thread_samples), ("guest", guest_samples)):
        p50, p99 = _percentiles(samples)
        rows.append(
            (
                f"latency aio {name}",
                f"p50 {p50 * 1e6:.0f} us (+{(p50 - t50) * 1e6:.0f})",
                f"p99 {p99 * 1e6:.0f} us (+{(p99 - t99) * 1e6:.0f})",
            )
        )

    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>32}  {note}")
    ratio = results["aio thread: 64 tasks"] / base
    verdict = "met" if ratio >= 0.5 else "NOT met"
    print(f"\ntarget aio thread >= 0.5x trio: {verdict} ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
