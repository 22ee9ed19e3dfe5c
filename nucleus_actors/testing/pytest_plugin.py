"""pytest plugin: fixtures for fault-injection tests of nucleus_actors modules.

Installed with the package (entry point `pytest11`: `nucleus_actors`); it needs pytest-trio
(tests are trio tests: `trio_mode = true`, or `@pytest.mark.trio`).

Fixtures:

* `nucleus_ledger`: opens `TrackedLedger`s (`async with nucleus_ledger(modules=[...]) as
  ledger`) whose invariants are checked when the block ends. A test that uses it runs on
  `trio.testing.MockClock(autojump_threshold=0)` (virtual time: hangs and timeouts cost
  nothing) unless it requests a clock fixture of its own or is marked `nucleus_real_clock`
  (needed with `SQLiteStorage`, whose worker threads the autojump clock cannot see).
* `nucleus_seed`: an int seed for this test: stable per test id, or `--nucleus-seed=N`.
* `nucleus_schedule`: a `FaultSchedule` on `nucleus_seed`.
* `nucleus_probe`: a fresh `Probe("probe")`.
* `nucleus_clock`: a `MockClock(autojump_threshold=0)` (request it to use virtual time without
  `nucleus_ledger`).

Options: `--nucleus-seed=N` replays a seed (every `nucleus_seed` is N);
`--nucleus-chaos-runs=N` scales chaos suites that read it (`nucleus_chaos_runs`).

When a test that used a seed, a schedule or `nucleus_ledger` fails, its report gets a
"nucleus_actors" section: the seed, the command that replays it, and every fault plan.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import AsyncIterator, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import LedgerConfig, Module, ModuleSpec
from nucleus_actors.storage import StorageBackend

from ._faults import FaultPlan, plans_of
from ._probe import Probe
from ._schedule import FaultSchedule
from ._tracked import TrackedLedger, open_tracked_ledger

__all__ = ["LedgerOpener"]

_SEED = pytest.StashKey[int]()
_SCHEDULES = pytest.StashKey[list[FaultSchedule]]()
_OPENER = pytest.StashKey["LedgerOpener"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nucleus_actors", "nucleus_actors fault injection")
    group.addoption(
        "--nucleus-seed",
        type=int,
        default=None,
        metavar="N",
        help="replay: every nucleus_seed (and so every fault schedule) uses seed N",
    )
    group.addoption(
        "--nucleus-chaos-runs",
        type=int,
        default=None,
        metavar="N",
        help="how many seeded runs chaos suites make per case (see nucleus_chaos_runs)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "nucleus_real_clock: run a test that uses nucleus_ledger on trio's real clock "
        "(e.g. with SQLiteStorage) instead of the autojump MockClock",
    )
    runs = config.getoption("nucleus_chaos_runs")
    if runs is not None and runs < 1:
        raise pytest.UsageError(f"--nucleus-chaos-runs must be >= 1, got {runs}")


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.getoption("nucleus_seed")
    if seed is None:
        return "nucleus_actors: seeds derived from test ids (replay one with --nucleus-seed=N)"
    return f"nucleus_actors: replaying --nucleus-seed={seed}"


def _run_on_mock_clock(fn: Callable[[], Any], **options: Any) -> Any:
    """`trio.run` on an autojump MockClock unless the test brought its own clock."""
    if options.get("clock") is None:
        options["clock"] = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(fn, **options)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # pytest-trio runs a test with the `run` of its first `trio` marker: put ours first.
    for item in items:
        uses = "nucleus_ledger" in getattr(item, "fixturenames", ())
        if uses and item.get_closest_marker("nucleus_real_clock") is None:
            item.add_marker(pytest.mark.trio(run=_run_on_mock_clock), append=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        lines = _failure_notes(item)
        if lines:
            report.sections.append(("nucleus_actors", "\n".join(lines)))
    return report


def _failure_notes(item: pytest.Item) -> list[str]:
    lines: list[str] = []
    seed = item.stash.get(_SEED, None)
    if seed is not None:
        lines.append(f"seed {seed}; replay with: pytest '{item.nodeid}' --nucleus-seed={seed}")
    for schedule in item.stash.get(_SCHEDULES, []):
        lines.append(schedule.describe())
    opener = item.stash.get(_OPENER, None)
    for number, (plans, ledger) in enumerate(opener.opened if opener else [], 1):
        lines.append(f"ledger #{number}: {ledger!r}")
        for name, plan in plans:
            lines.append(f"  {name}: {plan.describe(named=False)}")
        fired = [e for _, plan in plans for e in plan.fired()]
        for event in fired[:20]:
            assert event.fault is not None
            seq = f", seq {event.seq}" if event.seq is not None else ""
            lines.append(
                f"  fired: {event.module_id} {event.fault.describe()} "
                f"(call {event.call}, incarnation {event.incarnation}{seq})"
            )
        if len(fired) > 20:
            lines.append(f"  ... {len(fired) - 20} more faults fired")
        if ledger is not None and ledger.stop_report is not None:
            lines.append(f"  stop: {ledger.stop_report}")
    return lines


def _name(module: object) -> str:
    target = module.module if isinstance(module, ModuleSpec) else module
    return str(getattr(target, "id", None) or getattr(target, "__name__", repr(target)))


def _derived_seed(nodeid: str) -> int:
    return int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "big")


def _seed_trio_scheduler(seed: int) -> None:
    """Best effort: seed the generator trio uses to order ready tasks (a private detail of
    trio; skipped if it is not there), so that replaying a seed also replays the order in
    which trio runs tasks that become ready together."""
    rng = getattr(sys.modules.get("trio._core._run"), "_r", None)
    if isinstance(rng, random.Random):
        rng.seed(seed)


@pytest.fixture
def nucleus_seed(request: pytest.FixtureRequest) -> int:
    """The seed of this test: `--nucleus-seed` if given, else stable per test id.

    Printed (with the command that replays it) when the test fails. It also seeds trio's
    task-scheduling order (best effort), so a replay follows the same interleaving as far as
    trio allows.
    """
    seed = request.config.getoption("nucleus_seed")
    if seed is None:
        seed = _derived_seed(request.node.nodeid)
    request.node.stash[_SEED] = seed
    _seed_trio_scheduler(seed)
    return int(seed)


@pytest.fixture
def nucleus_schedule(request: pytest.FixtureRequest, nucleus_seed: int) -> FaultSchedule:
    """A `FaultSchedule(nucleus_seed)`; its plans are printed when the test fails."""
    schedule = FaultSchedule(nucleus_seed)
    request.node.stash.setdefault(_SCHEDULES, []).append(schedule)
    return schedule


@pytest.fixture
def nucleus_chaos_runs(request: pytest.FixtureRequest) -> int | None:
    """The `--nucleus-chaos-runs` value (None when not given: the suite's default)."""
    runs: int | None = request.config.getoption("nucleus_chaos_runs")
    return runs


@pytest.fixture
def nucleus_probe() -> Probe:
    """A fresh `Probe("probe")` (register it to record every delivery)."""
    return Probe("probe")


@pytest.fixture
def nucleus_clock() -> trio.testing.MockClock:
    """`MockClock(autojump_threshold=0)`: virtual time that jumps when every task waits."""
    return trio.testing.MockClock(autojump_threshold=0)


class LedgerOpener:
    """The `nucleus_ledger` fixture: `async with nucleus_ledger(modules=[...]) as ledger`.

    Each call opens a `TrackedLedger` (as `open_tracked_ledger`), runs `init_all` and
    `start_all`, and on leaving the block stops it and checks every invariant
    (`InvariantViolation` lists what broke; escalation re-raises `LedgerFailed` after the
    check). Keyword arguments other than the listed ones are `LedgerConfig` fields, e.g.
    `nucleus_ledger(modules=[m], strategy=Strategy.ONE_FOR_ALL, max_restarts=10)`.
    """

    def __init__(self) -> None:
        self.opened: list[tuple[list[tuple[str, FaultPlan]], TrackedLedger | None]] = []
        """Per call: the fault plans of its modules (name, plan) and the ledger (None if it
        did not open)."""

    @property
    def ledgers(self) -> list[TrackedLedger]:
        """Every ledger opened by this test, in order."""
        return [ledger for _, ledger in self.opened if ledger is not None]

    def __call__(
        self,
        *,
        modules: Sequence[Module | Callable[[], Module] | ModuleSpec[Any]] = (),
        config: LedgerConfig | None = None,
        storage: StorageBackend | None = None,
        check: bool = True,
        tag: bool = True,
        **config_fields: Any,
    ) -> AbstractAsyncContextManager[TrackedLedger]:
        """Open a tracked ledger running `modules`.

        Args:
            modules: modules, factories or `ModuleSpec`s.
            config: the ledger's configuration [`LedgerConfig(ledger_id="test",
                **config_fields)`]; give either this or config fields.
            storage: [`MemoryStorage()`].
            check: check the invariants on exit [True].
            tag: tag records (see `TrackedLedger`) [True].

        Raises:
            TypeError: both `config` and config fields were given.
        """
        if config is not None and config_fields:
            raise TypeError(
                f"nucleus_ledger takes a config or LedgerConfig fields, not both "
                f"(got fields {sorted(config_fields)})"
            )
        if config is None:
            config = LedgerConfig(**{"ledger_id": "test", **config_fields})
        return self._open(config, storage, modules, check, tag)

    @asynccontextmanager
    async def _open(
        self,
        config: LedgerConfig,
        storage: StorageBackend | None,
        modules: Sequence[Module | Callable[[], Module] | ModuleSpec[Any]],
        check: bool,
        tag: bool,
    ) -> AsyncIterator[TrackedLedger]:
        plans = [(_name(m), plan) for m in modules for plan in plans_of(m)]
        index = len(self.opened)
        self.opened.append((plans, None))
        async with open_tracked_ledger(
            config, storage=storage, modules=modules, check=check, tag=tag
        ) as ledger:
            self.opened[index] = (plans, ledger)
            yield ledger


@pytest.fixture
def nucleus_ledger(request: pytest.FixtureRequest) -> LedgerOpener:
    """Open tracked ledgers whose invariants are checked on exit (see `LedgerOpener`).

    The test runs on an autojump `MockClock` unless it requests its own clock fixture or is
    marked `@pytest.mark.nucleus_real_clock`.
    """
    opener = LedgerOpener()
    request.node.stash[_OPENER] = opener
    return opener
