"""A stalled durable module neither slows appends nor holds memory (issue 16's lag benchmark).

Run: `python benchmarks/bench_lag.py [--appends 200000] [--stall 10] [--rounds 3]`

Each run is a fresh subprocess (so its RSS says something) on a fresh SQLite ledger
(`durability="normal"`): 64 tasks append `--appends` records in total, one `append` each.

* `without`: no module.
* `with`: one durable module (`Overflow.CATCH_UP`, the default, inbox 64) whose first
  `after_append` waits `--stall` seconds (wall clock, counted from the first append). Appends
  must not wait for it: its inbox fills and the rest stays in storage. When released it
  catches up from storage and must end with lag 0, having seen every seq once, in order.

Runs alternate (without, with, without, with, ...); ratios are of the median rates. Rates are
given for the stall window (appends acknowledged in the first `--stall` s; all of them when
they end sooner, the module being stalled throughout) and over all appends (when the appends
outlast the stall, the released module catches up meanwhile and takes its share of the CPU).
Targets: append rate while the module is stalled >= 0.9x without it; RSS growth (after the
appends, and peak) < 30 MB over 200k appends. Also prints how long the module took to reach
lag 0 once released.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import trio

from nucleus_actors import Hash, LedgerConfig, Module, ModuleSpec, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage

TASKS = 64
INBOX = 64


def rss_mb() -> float:
    """Resident set size now, MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class Stalled(Module):
    """Waits for `release` in its first delivery, then records every seq it gets."""

    id = "stalled"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.seqs = array("q")

    async def after_append(self, record: Record, hash: Hash) -> None:
        await self.release.wait()
        assert record.seq is not None
        self.seqs.append(record.seq)


async def one_run(with_module: bool, appends: int, stall: float) -> dict[str, Any]:
    module = Stalled()
    specs = [ModuleSpec(module, durable=True, inbox=INBOX)] if with_module else []
    per_task = appends // TASKS
    total = per_task * TASKS
    with tempfile.TemporaryDirectory() as tmp:
        storage = SQLiteStorage(Path(tmp) / "l.db", durability="normal")
        async with open_ledger(
            LedgerConfig(ledger_id="lag"), storage=storage, modules=specs
        ) as led:
            rss0 = rss_mb()
            max_depth = 0
            done = 0
            in_stall = 0  # appends acknowledged within the first `stall` seconds
            began = time.perf_counter()

            async def writer(k: int) -> None:
                nonlocal max_depth, done
                for n in range(per_task):
                    await led.append(Record("k", {"w": k, "n": n}))
                    done += 1
                if with_module and k == 0:
                    max_depth = max(max_depth, led.modules.get("stalled").status.inbox_depth)

            async def releaser() -> None:
                # Both runs take the count at `stall` s; only the second has a module to free.
                nonlocal in_stall
                await trio.sleep(stall)
                in_stall = done
                module.release.set()

            async with trio.open_nursery() as outer:
                outer.start_soon(releaser)
                async with trio.open_nursery() as nursery:
                    for k in range(TASKS):
                        nursery.start_soon(writer, k)
                append_s = time.perf_counter() - began
                rss_after = rss_mb()
                lag_at_end = led.modules.get("stalled").status.lag if with_module else 0
            # The releaser fired (the nursery waited for it): time the catch-up.
            caught_s = 0.0
            in_order = True
            final_lag = 0
            if with_module:
                released = time.perf_counter()
                handle = led.modules.get("stalled")
                await handle.ask(lambda m: None)  # answered once caught up to the length
                caught_s = time.perf_counter() - released
                final_lag = handle.status.lag
                in_order = module.seqs.tolist() == list(range(total))
                max_depth = max(max_depth, handle.status.inbox_depth)
    return {
        # Stalled throughout when the appends end first.
        "stall_rate": in_stall / stall if stall <= append_s else total / append_s,
        "rate": total / append_s,
        "append_s": append_s,
        "rss_growth": rss_after - rss0,
        "peak_growth": peak_mb() - rss0,
        "lag_at_end_of_appends": lag_at_end,
        "catch_up_s": caught_s,
        "final_lag": final_lag,
        "in_order": in_order,
        "total": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=200_000)
    parser.add_argument("--stall", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = trio.run(one_run, args.one == "with", args.appends, args.stall)
        print(json.dumps(result))
        return
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for kind in ("without", "with"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", kind, "--appends", str(args.appends),
                 "--stall", str(args.stall)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            result = json.loads(out.stdout)
            runs[kind].append(result)
            print(
                f"{kind:8} {result['stall_rate']:8,.0f}/s while stalled, "
                f"{result['rate']:8,.0f}/s in all  RSS +{result['rss_growth']:5.1f} MB"
                f" (peak +{result['peak_growth']:5.1f})  lag after appends "
                f"{result['lag_at_end_of_appends']:7}  catch-up {result['catch_up_s']:5.2f} s"
                f"  final lag {result['final_lag']}  in order {result['in_order']}",
                flush=True,
            )
    total = runs["with"][0]["total"]
    print(
        f"\n{total} appends by {TASKS} tasks, module stalled {args.stall} s, "
        f"{args.rounds} rounds (median rates)"
    )
    for key, what in (
        ("stall_rate", "while the module is stalled (the first --stall s)"),
        ("rate", "over all appends (after release its catch-up shares the CPU)"),
    ):
        base = statistics.median(r[key] for r in runs["without"])
        cand = statistics.median(r[key] for r in runs["with"])
        print(f"{what}: without {base:,.0f}/s, with {cand:,.0f}/s, ratio {cand / base:.2f}x")
    print("target: ratio >= 0.9x while stalled")
    worst = max(r["rss_growth"] for r in runs["with"])
    worst_peak = max(r["peak_growth"] for r in runs["with"])
    print(f"RSS growth with the module   {worst:10.1f} MB after appends, peak +{worst_peak:.1f} MB"
          "  (target < 30 MB)")  # fmt: skip
    ok = all(r["final_lag"] == 0 and r["in_order"] for r in runs["with"])
    print(f"every run ended with lag 0, every seq once in order: {ok}")


if __name__ == "__main__":
    main()
