"""Append throughput of the engine (memory storage), side by side with its baselines.

Run: `python benchmarks/bench_append.py [--quick]` (needs the `bench` extra for eventsourcing).

Every figure is measured in the same run, on this machine; the table prints each rate with its
ratio to the baseline it is judged against:

  raw trio pipeline        the ceiling for one appender: the same channel hops as the engine
                           (3 request/reply round trips + 3 fan-out sends) and the same hashing
                           (canonical JSON, blake3 leaf + chain), with no engine around it
  ours: 1 task             1 task appending one record at a time, 3 modules with no-op
                           before_append + after_append                  (target >= 0.7x raw)
  ours: 64 tasks           64 tasks appending concurrently, same modules  (target >= 3x 1 task)
  ours: append_many 1000   batches of 1,000 records, same modules         (target >= 100k/s)
  eventsourcing POPO       the `eventsourcing` in-memory application, one event per save()
  ours: 0 modules, 1 task  1 task, no modules                 (target >= 1.0x eventsourcing)
  ... no tree              1 task, 64 tasks and append_many again with `merkle_tree=False`:
                           the cost of keeping the Merkle tree      (target <= 20 %)
  memory                   RSS growth over 200k appends through a module that sleeps 1 ms per
                           after_append (inbox 64), minus the stored entries' own bytes
                                                                          (target < 30 MB)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from blake3 import blake3

from nucleus_actors import Hash, LedgerConfig, Module, Record, open_ledger
from nucleus_actors.hashing import genesis
from nucleus_actors.storage import MemoryStorage

MODULES = 3


class NoOp(Module):
    """A module with no-op before_append and after_append."""

    def __init__(self, module_id: str) -> None:
        self.id = module_id

    async def before_append(self, record: Record) -> Record | None:
        return None

    async def after_append(self, record: Record, hash: Hash) -> None:
        return None


def _payload(i: int) -> dict[str, Any]:
    return {"order": i, "customer": "c-17", "items": ["apple", "pear"], "paid": True}


def _modules() -> list[Module]:
    return [NoOp(f"noop-{i}") for i in range(MODULES)]


# -- raw trio ceiling ---------------------------------------------------------------------


async def raw_pipeline(n: int) -> float:
    """One appender doing the engine's channel hops and hashing, with no engine."""
    async with trio.open_nursery() as nursery:
        requests = []
        replies = []
        fanouts = []
        for _ in range(MODULES):
            req_send, req_recv = trio.open_memory_channel[Any](0)
            rep_send, rep_recv = trio.open_memory_channel[Any](0)
            out_send, out_recv = trio.open_memory_channel[Any](64)

            async def actor(req_recv: Any, rep_send: Any, out_recv: Any) -> None:
                async def hooks() -> None:
                    async for record in req_recv:
                        await rep_send.send(record)  # "before_append" reply

                async def deliveries() -> None:
                    async for _ in out_recv:  # "after_append"
                        pass

                async with trio.open_nursery() as inner:
                    inner.start_soon(hooks)
                    inner.start_soon(deliveries)

            nursery.start_soon(actor, req_recv, rep_send, out_recv)
            requests.append(req_send)
            replies.append(rep_recv)
            fanouts.append(out_send)
        head = bytes(genesis("bench"))
        start = time.perf_counter()
        for seq in range(n):
            record = {"kind": "order.created", "meta": {}, "payload": _payload(seq)}
            for req, rep in zip(requests, replies, strict=True):
                await req.send(record)
                record = await rep.receive()
            record["seq"], record["ts"] = seq, 1_700_000_000_000_000
            data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            leaf = blake3(b"\x00" + data).digest()
            head = blake3(b"\x02" + head + seq.to_bytes(8, "big") + leaf).digest()
            for out in fanouts:
                await out.send((record, head))
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return n / elapsed


# -- the engine -------------------------------------------------------------------------------


def _config(tree: bool) -> LedgerConfig:
    # merkle_tree=False: the engine keeps no Merkle tree (the baseline of the tree's cost).
    return LedgerConfig(ledger_id="bench", merkle_tree=tree)


async def ours_single(n: int, modules: int = MODULES, tree: bool = True) -> float:
    mods = _modules()[:modules]
    async with open_ledger(_config(tree), modules=mods) as ledger:
        start = time.perf_counter()
        for i in range(n):
            await ledger.append(Record("order.created", _payload(i)))
        return n / (time.perf_counter() - start)


async def ours_zero_modules(n: int) -> float:
    return await ours_single(n, modules=0)


async def ours_concurrent(n: int, tasks: int = 64, tree: bool = True) -> float:
    async with open_ledger(_config(tree), modules=_modules()) as ledger:
        per_task = n // tasks

        async def appender(t: int) -> None:
            for i in range(per_task):
                await ledger.append(Record("order.created", _payload(t * per_task + i)))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(appender, t)
        return per_task * tasks / (time.perf_counter() - start)


async def ours_many(n: int, size: int = 1000, tree: bool = True) -> float:
    async with open_ledger(_config(tree), modules=_modules()) as ledger:
        batches = [
            [Record("order.created", _payload(b * size + i)) for i in range(size)]
            for b in range(n // size)
        ]
        start = time.perf_counter()
        for batch in batches:
            await ledger.append_many(batch)
        return len(batches) * size / (time.perf_counter() - start)


async def ours_many_including_construction(n: int, size: int = 1000) -> float:
    """As `ours_many`, but building the Records (validation + encoding) inside the timing."""
    async with open_ledger(LedgerConfig(ledger_id="bench"), modules=_modules()) as ledger:
        start = time.perf_counter()
        for b in range(n // size):
            await ledger.append_many(
                [Record("order.created", _payload(b * size + i)) for i in range(size)]
            )
        return n // size * size / (time.perf_counter() - start)


# -- eventsourcing ----------------------------------------------------------------------------


@functools.cache
def _es_order() -> Any:
    """The eventsourcing aggregate (defined once: eventsourcing registers classes by topic)."""
    from eventsourcing.domain import Aggregate, event

    class Order(Aggregate):
        @event("Created")
        def __init__(self) -> None:
            self.count = 0

        @event("ItemAdded")
        def add(self, order: int, customer: str, items: list[str], paid: bool) -> None:
            self.count += 1

    return Order


async def eventsourcing_popo(n: int) -> float:
    from eventsourcing.application import Application

    Order = _es_order()
    app = Application(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    aggregate = Order()
    app.save(aggregate)
    start = time.perf_counter()
    for i in range(n):
        aggregate.add(**_payload(i))
        app.save(aggregate)
    rate = n / (time.perf_counter() - start)
    await trio.lowlevel.checkpoint()
    return rate


# -- memory under a slow module ---------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class Sleepy(Module):
    id = "sleepy"

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(0.001)


async def memory_growth(n: int) -> dict[str, float]:
    """RSS growth over n appends through a 1 ms/after_append module (inbox 64), and the size of
    what the ledger legitimately keeps: the stored entries (MemoryStorage rows)."""
    storage = MemoryStorage()
    gc.collect()
    async with open_ledger(LedgerConfig(ledger_id="bench"), storage=storage) as ledger:
        await ledger.add(Sleepy(), inbox=64)
        gc.collect()
        before = _rss_bytes()
        tasks = 8

        async def appender(t: int) -> None:
            for i in range(n // tasks):
                await ledger.append(Record("order.created", _payload(i)))

        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(appender, t)
        depth = ledger.modules.get("sleepy").status.inbox_depth
        gc.collect()
        after = _rss_bytes()
        rows = storage._rows
        stored = sys.getsizeof(rows) + sum(
            sys.getsizeof(row) + sys.getsizeof(row[0]) + sys.getsizeof(row[1]) for row in rows
        )
    mb = 1 << 20
    return {
        "appends": len(rows),
        "growth_mb": (after - before) / mb,
        "stored_mb": stored / mb,
        "beyond_mb": (after - before - stored) / mb,
        "inbox_depth_at_end": depth,
    }


# -- driver -----------------------------------------------------------------------------------


async def main(quick: bool, rounds: int) -> None:
    n = 5_000 if quick else 20_000
    scenarios: dict[str, tuple[Callable[[int], Awaitable[float]], int]] = {
        "raw": (raw_pipeline, n),
        "single": (ours_single, n),
        # Each engine scenario again without the Merkle tree, right after it: the tree's cost.
        "single_notree": (functools.partial(ours_single, tree=False), n),
        "concurrent": (ours_concurrent, n * 2),
        "concurrent_notree": (functools.partial(ours_concurrent, tree=False), n * 2),
        "many": (ours_many, n * 5),
        "many_notree": (functools.partial(ours_many, tree=False), n * 5),
        "many_built": (ours_many_including_construction, n * 5),
        "es": (eventsourcing_popo, n),
        "zero": (ours_zero_modules, n),
    }
    # Rounds interleave the scenarios, so a slow spell of the machine hits the baselines and
    # the engine alike; each scenario reports its best round (and the median).
    samples: dict[str, list[float]] = {name: [] for name in scenarios}
    for _ in range(rounds):
        for name, (fn, size) in scenarios.items():
            samples[name].append(await fn(size))
    best = {name: max(values) for name, values in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    rows: list[tuple[str, str, str, str, str]] = []

    def row(name: str, key: str, base: str | None, target: str) -> None:
        ratio = f"{best[key] / best[base]:.2f}x" if base else ""
        rows.append((name, f"{best[key]:,.0f}/s", f"{median[key]:,.0f}/s", ratio, target))

    row("raw trio pipeline (ceiling)", "raw", None, "")
    row("ours: 1 task, 3 modules", "single", "raw", ">= 0.70x raw")
    row("ours: 64 tasks, 3 modules", "concurrent", "single", ">= 3x 1 task")
    row("ours: append_many 1000, 3 modules", "many", None, ">= 100,000/s")
    row("  (records built inside the timing)", "many_built", None, "")
    row("eventsourcing POPO, 1 event/save", "es", None, "")
    row("ours: 0 modules, 1 task", "zero", "es", ">= 1.0x eventsourcing")

    row("ours: 1 task, 3 modules, no tree", "single_notree", None, "")
    row("ours: 64 tasks, 3 modules, no tree", "concurrent_notree", None, "")
    row("ours: append_many 1000, no tree", "many_notree", None, "")

    width = max(len(r[0]) for r in rows)
    print(f"{rounds} interleaved rounds; best round, median round, ratio of the best rounds")
    print(f"{'scenario':<{width}}  {'best':>12}  {'median':>12}  {'ratio':>7}  target")
    for name, best_s, median_s, ratio, target in rows:
        print(f"{name:<{width}}  {best_s:>12}  {median_s:>12}  {ratio:>7}  {target}")

    print("\ncost of keeping the Merkle tree (1 - with / without, best rounds; target <= 20 %):")
    for label, key in (("1 task", "single"), ("64 tasks", "concurrent"), ("append_many", "many")):
        cost = 100 * (1 - best[key] / best[f"{key}_notree"])
        verdict = "ok" if cost <= 20 else "MISSED"
        print(
            f"  {label:<12} {best[key]:>10,.0f}/s vs {best[f'{key}_notree']:>10,.0f}/s  "
            f"cost {cost:5.1f} %  {verdict}"
        )

    # In a fresh process, so that memory freed by the scenarios above does not hide growth.
    appends = 20_000 if quick else 200_000
    result = await trio.run_process(
        [sys.executable, __file__, "--memory", str(appends)], capture_stdout=True
    )
    mem = json.loads(result.stdout)
    print(
        f"memory: {mem['appends']:,} appends through a 1 ms/after_append module (inbox 64): "
        f"RSS +{mem['growth_mb']:.1f} MB, stored entries {mem['stored_mb']:.1f} MB, "
        f"growth beyond them {mem['beyond_mb']:.1f} MB (target < 30 MB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--memory", type=int, metavar="N", help="only the memory scenario")
    args = parser.parse_args()
    if args.memory:
        print(json.dumps(trio.run(memory_growth, args.memory)))
    else:
        trio.run(main, args.quick, 1 if args.quick else args.rounds)
