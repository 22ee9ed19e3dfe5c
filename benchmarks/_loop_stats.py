"""Run `nucleus` with a trio instrument that times every task step (benchmark helper).

`python benchmarks/_loop_stats.py OUT.json run CONFIG ...` runs `nucleus run CONFIG ...` with
an instrument on its trio loop: each task step's thread CPU time (how long it held the loop,
whatever else the machine was doing) and each cyclic garbage collection's. At exit, the
steps go to OUT.json (`summary` reads them back for a time window). Used by
`bench_amplification.py --loop-stats`.
"""

from __future__ import annotations

import gc
import json
import runpy
import sys
import time
from typing import Any

import trio

steps: list[tuple[float, float]] = []  # (time.monotonic() at the end, CPU seconds)
collections: list[tuple[float, float, int]] = []  # (end, CPU seconds, generation)


class StepTimer(trio.abc.Instrument):
    def __init__(self) -> None:
        self.started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        steps.append((time.monotonic(), time.thread_time() - self.started))


_gc_started: list[float] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started.append(time.thread_time())
    elif _gc_started:
        cpu = time.thread_time() - _gc_started.pop()
        collections.append((time.monotonic(), cpu, info["generation"]))


def _report(path: str) -> None:
    with open(path, "w") as out:
        json.dump({"steps": steps, "collections": collections}, out)


def summary(path: str, start: float, end: float) -> str:
    """The loop steps and full collections between `start` and `end` (`time.monotonic()`,
    the same clock in every process), as a line for the benchmark's report."""
    with open(path) as data:
        raw = json.load(data)
    ordered = sorted(cpu for at, cpu in raw["steps"] if start <= at <= end)
    full = sorted((cpu for at, cpu, g in raw["collections"] if start <= at <= end and g == 2))
    count = len(ordered)
    if not count:
        return "event loop: no steps in the window"

    def at(q: float) -> float:
        return ordered[min(count - 1, int(q * count))] * 1e3

    return (
        f"event loop while loaded (CPU time per task step): {count} steps, p99 {at(0.99):.1f} "
        f"ms, p99.9 {at(0.999):.1f} ms, longest {[round(c * 1e3, 1) for c in ordered[-3:][::-1]]} "
        f"ms, {sum(c > 0.02 for c in ordered)} over 20 ms; {len(full)} full GCs, longest "
        f"{round(full[-1] * 1e3, 1) if full else 0} ms"
    )


def main() -> None:
    path = sys.argv[1]
    original = trio.run

    def run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), StepTimer()]
        try:
            return original(*args, **kwargs)
        finally:
            _report(path)

    trio.run = run  # type: ignore[assignment]
    gc.callbacks.append(_on_gc)
    sys.argv = ["nucleus", *sys.argv[2:]]
    runpy.run_module("nucleus_actors", run_name="__main__")


if __name__ == "__main__":
    main()
