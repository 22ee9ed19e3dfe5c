"""One chaos run: seeded random faults in every callback of several modules, concurrent
appenders (some cancelled, some rejected), then every invariant of `TrackedLedger.check`.

Everything random is drawn from one `FaultSchedule(seed)`, so a seed replays a run exactly on
the MockClock (on the real clock, with SQLite, thread timing can still vary).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from nucleus_actors import (
    Backoff,
    Hash,
    Isolation,
    LedgerConfig,
    LedgerFailed,
    LifecycleError,
    Module,
    ModuleContext,
    ModuleError,
    ModuleSpec,
    ModuleState,
    NucleusError,
    Overflow,
    Record,
    RecordRejected,
    Restart,
    StorageError,
    Strategy,
)
from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBackend, StorageBatch
from nucleus_actors.testing import (
    CheckReport,
    FaultSchedule,
    Probe,
    TrackedLedger,
)


class Validator(Module):
    """Rejects records flagged bad; stamps the others (a before_append that transforms)."""

    def __init__(self, module_id: str) -> None:
        self.id = module_id
        self.checked = 0

    async def before_append(self, record: Record) -> Record | None:
        self.checked += 1
        if isinstance(record.payload, dict) and record.payload.get("bad"):
            raise RecordRejected("flagged bad")
        return record.with_meta({f"checked-by-{self.id}": "yes"})


class Sink(Module):
    """Counts deliveries; every few records it spawns a short background flush."""

    def __init__(self, module_id: str, flush: float) -> None:
        self.id = module_id
        self.flush = flush
        self.count = 0
        self.ctx: ModuleContext | None = None

    async def start(self, ctx: ModuleContext) -> None:
        self.ctx = ctx

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.count += 1
        if self.ctx is not None and record.seq is not None and record.seq % 3 == 0:
            self.ctx.spawn(self._flush, exit_on_return=False)

    async def _flush(self) -> None:
        await trio.sleep(self.flush)


class DurableSink(Module):
    """A durable module on the runtime cursor (at least once): it counts its deliveries."""

    def __init__(self, module_id: str) -> None:
        self.id = module_id
        self.count = 0

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.count += 1


def isolated_validator() -> Validator:
    """The validator as an isolated module builds it (a factory importable by name)."""
    return Validator("validator")


def isolated_sink_1() -> Sink:
    return Sink("sink-1", REAL.flush)


def isolated_sink_2() -> Sink:
    return Sink("sink-2", REAL.flush)


def isolated_durable() -> DurableSink:
    return DurableSink("durable")


ISOLATED_SINKS = {1: isolated_sink_1, 2: isolated_sink_2}


class OwnPosition(Module):
    """A durable module that owns its position: `store` (shared by every instance, and by the
    ledger's next opening) plays its database, effect and position written in one step."""

    def __init__(self, module_id: str, store: dict[str, int]) -> None:
        self.id = module_id
        self.store = store

    async def resume_after(self, ctx: ModuleContext) -> int | None:
        return self.store.get("last")

    async def after_append(self, record: Record, hash: Hash) -> None:
        assert record.seq is not None
        if record.seq != self.store.get("last", -1) + 1:  # a gap or a duplicate in its store
            self.store["errors"] = self.store.get("errors", 0) + 1
        self.store["last"] = record.seq


@dataclass
class RunSummary:
    """What one run did (the suite adds these up into its report)."""

    seed: int
    outcome: str = "stopped"  # stopped | escalated | startup_failed
    durable: bool = False  # durable modules ran (and the ledger was opened a second time)
    reopened: str | None = None  # outcome of the second opening
    faults_planned: int = 0
    faults_fired: Counter[str] = field(default_factory=Counter)
    appended: int = 0
    failed_appends: int = 0
    cancelled_appends: int = 0
    restarts: int = 0
    report: CheckReport | None = None


@dataclass(frozen=True)
class Timing:
    timeout: float
    shutdown: float
    pause: float  # longest pause between an appender's operations
    flush: float
    limit: float  # a run that takes longer than this hangs (trio's clock, seconds)


MOCK = Timing(timeout=1.0, shutdown=0.5, pause=0.05, flush=0.2, limit=2000.0)
REAL = Timing(timeout=0.25, shutdown=0.2, pause=0.005, flush=0.01, limit=60.0)


class ChaosHang(AssertionError):
    """A run did not finish within its time limit: something waits forever."""


INDETERMINATE_STORAGE_FAULTS = True
"""Storage faults of unknown outcome (the batch may have landed) are on: runtime bug B5, which
lost such a batch to the modules when the ledger stopped first, is fixed."""


class FlakyStorage(MemoryStorage):
    """MemoryStorage whose appends fail now and then: before writing (nothing stored), after
    writing (it landed; the engine finds it in the head), or after writing with the head
    unreadable for a moment (outcome unknown; only with INDETERMINATE_STORAGE_FAULTS)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.head_broken = False

    async def append(self, batch: StorageBatch) -> None:
        roll = self.rng.random()
        if roll < 0.04:
            await trio.lowlevel.checkpoint()
            raise StorageError("injected: the write failed")
        await super().append(batch)
        if not batch.entries:
            return  # durable modules' cursors alone: the engine reads no head after those
        if roll < 0.08:
            raise StorageError("injected: failed after writing")
        if roll < 0.11 and INDETERMINATE_STORAGE_FAULTS:
            self.head_broken = True
            raise StorageError("injected: failed after writing, head unreadable")

    async def head(self) -> tuple[int, Hash]:
        if self.head_broken:
            self.head_broken = False
            raise StorageError("injected: head unreadable")
        return await super().head()


def _storage(kind: str, tmp_path: Path, seed: int) -> StorageBackend:
    if kind == "memory":
        return MemoryStorage()
    if kind == "flaky":
        return FlakyStorage(random.Random(f"{seed}:storage"))
    return SQLiteStorage(tmp_path / f"chaos-{seed}.db", durability="normal")


SETTLE_BEFORE_STOP = False
"""Runs may stop in the middle of a group restart: runtime bug B4 (its regression test is in
tests/integration/test_supervision.py), which dropped a healthy sibling's queued deliveries
then, is fixed. Set it to True to wait for supervision to settle (no module RESTARTING) before
stopping."""


async def _settle(ledger: TrackedLedger) -> None:
    """Return when no module is RESTARTING, with no checkpoint before the caller's next step
    (so no restart round can begin before the stop that follows)."""
    while any(h.state is ModuleState.RESTARTING for h in ledger.modules):
        await trio.sleep(0.01)


async def _cancelled_append(ledger: TrackedLedger, record: Record, rng: random.Random) -> None:
    """An append whose caller is cancelled after 0..6 scheduling steps (anywhere in the
    pipeline: before the hooks, in them, in storage, or after it returned)."""
    steps = rng.randint(0, 6)
    error: NucleusError | None = None
    async with trio.open_nursery() as nursery:

        async def cancel_soon() -> None:
            for _ in range(steps):
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_soon)
        try:
            await ledger.append(record)
        except NucleusError as exc:
            error = exc  # raised bare below, not inside the nursery's exception group
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error


async def chaos_run(
    seed: int,
    *,
    storage: str,
    strategy: Strategy,
    tmp_path: Path,
    real_clock: bool,
    isolated: bool = False,
) -> RunSummary:
    """Run one seeded chaos scenario; raise `InvariantViolation` if an invariant breaks.

    With `isolated`, the validator, the sinks and the durable sink run in worker processes
    (`Isolation.PROCESS`, real clock only): the plans' crashes SIGKILL them, their hangs
    block them for real.

    Raises:
        ChaosHang: the run did not end within its limit (the ledger's state is in the message).
    """
    timing = REAL if real_clock else MOCK
    ledgers: list[TrackedLedger] = []
    with trio.move_on_after(timing.limit) as scope:
        summary = await _chaos_run(seed, storage, strategy, tmp_path, timing, ledgers, isolated)
    if scope.cancelled_caught:
        ledger = ledgers[0] if ledgers else None
        detail = "" if ledger is None else f" {ledger!r} {ledger.modules.status()}"
        raise ChaosHang(f"chaos run seed={seed} did not finish in {timing.limit} s:{detail}")
    return summary


async def _chaos_run(
    seed: int,
    storage: str,
    strategy: Strategy,
    tmp_path: Path,
    timing: Timing,
    ledgers: list[TrackedLedger],
    isolated: bool = False,
) -> RunSummary:
    rng = random.Random(f"{seed}:scenario")
    # Durable modules in a share of the runs, with a second opening of the same storage: they
    # catch up from their positions (crashes during catch-up, at the switch to live, a stop
    # while they lag are all drawn by the schedule). Drawn from a stream of its own so that
    # the other choices of a seed stay as they were.
    durable_rng = random.Random(f"{seed}:durable")
    durable = durable_rng.random() < 0.4
    summary = RunSummary(seed, durable=durable)
    backend = _storage(storage, tmp_path, seed)
    own_store: dict[str, int] = {}
    summary.outcome = await _session(
        seed, "", rng, durable_rng if durable else None, backend, own_store, strategy, timing,
        ledgers, summary, isolated,
    )  # fmt: skip
    if durable:
        if isinstance(backend, SQLiteStorage):
            backend = SQLiteStorage(backend.path, durability="normal")
        summary.reopened = await _session(
            seed, "reopen:", random.Random(f"{seed}:reopen"), durable_rng, backend, own_store,
            strategy, timing, ledgers, summary, isolated,
        )  # fmt: skip
        # Its effects are exactly once: every seq it recorded follows the one before.
        assert own_store.get("errors", 0) == 0, f"'own' recorded a gap or a duplicate: {own_store}"
    return summary


async def _session(
    seed: int,
    prefix: str,
    rng: random.Random,
    durable_rng: random.Random | None,
    backend: StorageBackend,
    own_store: dict[str, int],
    strategy: Strategy,
    timing: Timing,
    ledgers: list[TrackedLedger],
    summary: RunSummary,
    isolated: bool = False,
) -> str:
    """One opening of the ledger: modules with faults, appenders, maybe a stop, the check.
    Returns how it ended (stopped | escalated | startup_failed)."""
    startup = rng.random() < 0.1
    schedule = FaultSchedule(
        seed, max_faults=3, horizon=12, startup=startup, max_delay=timing.timeout * 0.6
    )

    def spec(module: Any, **options: Any) -> ModuleSpec[Any]:
        return ModuleSpec(
            module,
            timeout=timing.timeout,
            shutdown=timing.shutdown,
            inbox=rng.randint(1, 8),
            **options,
        )

    lifecycle = ["init", "start", "stop"]
    validator_plan = schedule.plan(f"{prefix}validator", callbacks=[*lifecycle, "before_append"])
    sink_callbacks = [*lifecycle, "after_append", "after_append", "background"]
    sink_plans = [schedule.plan(f"{prefix}sink-{n}", callbacks=sink_callbacks) for n in (1, 2)]
    plans = [validator_plan, *sink_plans]

    def sink(n: int) -> Any:
        plan = sink_plans[n - 1]
        if isolated:
            return plan.wrap(ISOLATED_SINKS[n])
        if rng.random() < 0.5:  # a factory: a fresh instance per incarnation
            return plan.wrap(lambda: Sink(f"sink-{n}", timing.flush))
        return plan.wrap(Sink(f"sink-{n}", timing.flush))

    second_restart = rng.choice([Restart.PERMANENT, Restart.TRANSIENT, Restart.TEMPORARY])
    second_overflow = rng.choice([Overflow.BLOCK] * 4 + [Overflow.DROP_OLDEST, Overflow.FAIL])
    where = {"isolation": Isolation.PROCESS} if isolated else {}
    validator = isolated_validator if isolated else Validator("validator")
    specs = [
        spec(validator_plan.wrap(validator), restart=Restart.PERMANENT, **where),
        spec(sink(1), restart=Restart.PERMANENT, **where),
        spec(sink(2), restart=second_restart, overflow=second_overflow, **where),
        spec(Probe("probe"), restart=Restart.PERMANENT),
    ]
    rng.shuffle(specs)
    if durable_rng is not None:
        hooks = [*lifecycle, "after_append", "after_append", "after_append"]
        cursor_plan = schedule.plan(f"{prefix}durable", callbacks=hooks)
        own_plan = schedule.plan(f"{prefix}own", callbacks=[*hooks, "resume_after"])
        plans += [cursor_plan, own_plan]
        # Isolated runs: the durable sink runs in a worker too (its catch-up batches are read
        # by the parent and forwarded); "own" shares `own_store` with the test, so stays a task.
        durable_sink: Any = isolated_durable if isolated else lambda: DurableSink("durable")
        for plan, make, options in (
            (cursor_plan, durable_sink, where),
            (own_plan, lambda: OwnPosition("own", own_store), {}),
        ):
            specs.insert(
                durable_rng.randrange(len(specs) + 1),
                ModuleSpec(
                    plan.wrap(make),
                    durable=True,
                    overflow=durable_rng.choice([Overflow.CATCH_UP] * 3 + [Overflow.BLOCK]),
                    inbox=durable_rng.randint(1, 4),  # small: it lags and reads back often
                    restart=durable_rng.choice([Restart.PERMANENT, Restart.TRANSIENT]),
                    timeout=timing.timeout,
                    shutdown=timing.shutdown,
                    **options,
                ),
            )
    for plan in plans:
        summary.faults_planned += len(plan.faults)
    backoff = None
    if rng.random() < 0.3:
        backoff = Backoff(initial=timing.timeout / 10, max=timing.timeout, jitter=0.5,
                          rng=random.Random(seed))  # fmt: skip
    config = LedgerConfig(
        ledger_id="chaos",
        strategy=strategy,
        max_restarts=rng.choice([1, 2, 4, 8, 16, 32]),
        restart_window=5.0,
        backoff=backoff,
        cursor_interval=timing.timeout,
    )
    ledger = TrackedLedger(config, backend)
    ledgers.append(ledger)
    for item in specs:
        ledger.register(item)

    async def appender(index: int) -> None:
        mine = random.Random(f"{seed}:{prefix}appender:{index}")
        for op in range(mine.randint(4, 12)):
            await trio.sleep(mine.uniform(0, timing.pause))
            payload = {"appender": index, "op": op, "bad": mine.random() < 0.1}
            choice = mine.random()
            try:
                if choice < 0.15:
                    size = mine.randint(2, 3)
                    await ledger.append_many(
                        Record("chaos.batch", {**payload, "item": i}) for i in range(size)
                    )
                elif choice < 0.3:
                    await _cancelled_append(ledger, Record("chaos.cancelled", payload), mine)
                else:
                    await ledger.append(Record("chaos.one", payload))
            except (RecordRejected, ModuleError, StorageError):
                continue  # a veto, a crash, a timeout, a fail-closed validator, a bad disk
            except LifecycleError:
                return  # the ledger failed or is stopping

    outcome = "stopped"
    started = False
    try:
        async with ledger:
            await ledger.init_all()
            await ledger.start_all()
            started = True
            async with trio.open_nursery() as nursery:
                for index in range(rng.randint(1, 4)):
                    nursery.start_soon(appender, index)
            if rng.random() < 0.5:
                await ledger.wait_delivered()
            if SETTLE_BEFORE_STOP:
                await _settle(ledger)
            if rng.random() < 0.5:
                await ledger.stop_all()
    except LedgerFailed:
        outcome = "escalated"
    except ModuleError:
        if started:
            raise
        outcome = "startup_failed"
    report = await ledger.check()
    if summary.report is None:
        summary.report = report
    summary.appended += report.appended
    summary.failed_appends += report.failed
    summary.cancelled_appends += report.cancelled
    summary.restarts += ledger.statistics().restarts
    for plan in plans:
        for event in plan.fired():
            assert event.fault is not None
            summary.faults_fired[event.fault.action.value] += 1
    return outcome


def describe(seed: int, storage: str, strategy: Strategy, isolated: bool = False) -> str:
    """What a failing run prints: how to replay it."""
    return (
        f"chaos run seed={seed} storage={storage} strategy={strategy.value}"
        f"{' isolated' if isolated else ''}; the fault "
        f"schedule is FaultSchedule({seed}) (see tests/faults/chaos.py)"
    )
