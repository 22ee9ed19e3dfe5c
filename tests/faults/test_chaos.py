"""The chaos suite: many seeds x concurrent appenders x random faults in every callback, with
memory storage (MockClock) and SQLite (real clock, small sizes), under every strategy.

Each run ends with `TrackedLedger.check()`: the chain verifies, every acknowledged receipt is
stored, no failed append is stored, every committed entry reached each module that must have
it (in order per incarnation), and stopping kept to its deadlines.

A third group runs on a MemoryStorage whose appends fail now and then (before or after
writing). A fourth runs the validator and the sinks isolated (`Isolation.PROCESS`, real
clock), so that crashes are real SIGKILLs of worker processes and hangs really block them.
`--nucleus-chaos-runs=N` sets the runs per strategy with memory storage (default 100; flaky
storage gets N // 5, SQLite N // 10, isolated N // 20, at least 1 each); `--nucleus-seed=S`
replays one seed (pick the case with `-k`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio.testing

from nucleus_actors import Strategy

from .chaos import RunSummary, chaos_run, describe

__all__ = ["SUMMARIES", "Counter"]

SUMMARIES: list[RunSummary] = []
"""Every run of this session (the conftest prints the totals)."""

MEMORY_RUNS = 100
STRATEGIES = list(Strategy)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "chaos_run" not in metafunc.fixturenames:
        return
    runs = metafunc.config.getoption("nucleus_chaos_runs") or MEMORY_RUNS
    name = metafunc.function.__name__
    if name.endswith("sqlite"):
        runs = max(1, runs // 10)
    elif name.endswith("isolated"):
        runs = max(1, runs // 20)
    elif name.endswith("flaky_storage"):
        runs = max(1, runs // 5)
    metafunc.parametrize("chaos_run", range(runs), ids=lambda n: f"run{n}")


async def _run(
    seed: int, storage: str, strategy: Strategy, tmp_path: Path, real: bool, isolated: bool = False
) -> None:
    try:
        summary = await chaos_run(
            seed,
            storage=storage,
            strategy=strategy,
            tmp_path=tmp_path,
            real_clock=real,
            isolated=isolated,
        )
    except BaseException as exc:
        exc.add_note(describe(seed, storage, strategy, isolated))
        raise
    SUMMARIES.append(summary)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
async def test_chaos_memory(
    strategy: Strategy,
    chaos_run: int,
    nucleus_seed: int,
    nucleus_clock: trio.testing.MockClock,
    tmp_path: Path,
) -> None:
    await _run(nucleus_seed, "memory", strategy, tmp_path, real=False)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
async def test_chaos_flaky_storage(
    strategy: Strategy,
    chaos_run: int,
    nucleus_seed: int,
    nucleus_clock: trio.testing.MockClock,
    tmp_path: Path,
) -> None:
    await _run(nucleus_seed, "flaky", strategy, tmp_path, real=False)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
async def test_chaos_sqlite(
    strategy: Strategy, chaos_run: int, nucleus_seed: int, tmp_path: Path
) -> None:
    await _run(nucleus_seed, "sqlite", strategy, tmp_path, real=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.value)
async def test_chaos_isolated(
    strategy: Strategy, chaos_run: int, nucleus_seed: int, tmp_path: Path
) -> None:
    """The validator and both sinks in worker processes (real clock: workers really run)."""
    await _run(nucleus_seed, "memory", strategy, tmp_path, real=True, isolated=True)
