"""`TrackedLedger`: a `LedgerEngine` that remembers every append and checks the invariants.

The invariants (`TrackedLedger.check`) are the runtime's promises under faults:

1. the stored chain verifies, and storage holds exactly what the ledger committed;
2. every acknowledged append (a returned `Receipt`) is stored, at its seq, with its hash and
   timestamp;
3. no append that raised an error is stored (one whose caller was *cancelled* may be: its
   acknowledgement was lost, as with any database; so may one that failed with a
   `CommitUnknown`: storage could not tell whether it was stored), and nothing is stored
   twice;
4. every committed entry reached each watched module (a `Probe`, or a module wrapped by a
   `FaultPlan`) in order within each incarnation, the delivery a module crashed on first in
   its next incarnation, and at least once in all, unless the module legitimately missed
   some (see `CheckReport.waived`); a module with `BLOCK` or a durable one (`CATCH_UP`) gets
   them with **no gap, in order**: a durable module's first delivery in this session is at
   or before the first entry of the session (it catches up from its position; `start_at=
   "end"` aside), each later one is the next seq, and after a crash it resumes at the
   delivery it crashed on (or just after it, when it owns its position and had recorded it);
   one that is still lagging when the ledger closes is waived from "every entry" only;
5. `stop_all` (or leaving the `async with` block) finished within the modules' deadlines,
   with every module STOPPED or FAILED.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import trio
import trio.testing

from nucleus_actors import (
    CommitUnknown,
    Entry,
    IntegrityError,
    LedgerConfig,
    LedgerEngine,
    LedgerFailed,
    Module,
    ModuleError,
    ModuleHandle,
    ModuleSpec,
    ModuleState,
    ModuleStatus,
    NucleusError,
    Overflow,
    Phase,
    Receipt,
    Record,
    Restart,
)
from nucleus_actors.storage import StorageBackend

from ._events import Callback, CallbackEvent, CallbackLog, CallOutcome
from ._faults import plans_of
from ._probe import Probe

__all__ = [
    "TAG_KEY",
    "AppendCall",
    "CheckReport",
    "InvariantViolation",
    "StopReport",
    "TrackedLedger",
    "open_tracked_ledger",
]

M = TypeVar("M", bound=Module)

TAG_KEY: Final = "nucleus.testing.tag"
"""Meta key a `TrackedLedger` adds to every record it appends, to tell appends apart."""

_LOGS_ATTR = "log"
_SHOWN = 25  # violations listed in an InvariantViolation's message


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendCall:
    """One `append`/`append_many` call made through a `TrackedLedger`, and how it ended."""

    records: tuple[Record, ...]
    """The records as submitted (tagged with `TAG_KEY` unless tagging is off)."""
    tags: tuple[str | None, ...]
    """Each record's tag (None when tagging is off)."""
    receipts: tuple[Receipt, ...] | None
    """The receipts, if the call returned."""
    error: BaseException | None
    """The exception the call raised, if any."""
    cancelled: bool
    """The call was cancelled (its outcome is unknown: the records may or may not be stored)."""
    indeterminate: bool = False
    """The call failed with `CommitUnknown`: storage could not tell whether the batch was
    stored (its outcome is unknown, as for a cancelled call)."""

    @property
    def acknowledged(self) -> bool:
        """Whether the call returned receipts."""
        return self.receipts is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class StopReport:
    """How long the ledger took to stop, against the bound its modules' deadlines allow."""

    elapsed: float
    """Seconds (trio's clock) from the start of `stop_all` (or of leaving the block) to its end."""
    bound: float | None
    """The longest the stop may take: for the appends in flight, the longest `shutdown` once
    per append call in flight plus once (the stop waits while they make progress), plus the sum
    of every module's `shutdown` (each drains and stops within its own); None when some module
    has `shutdown=None` (no bound)."""
    mock_clock: bool
    """Whether trio's clock was a `MockClock` (then the bound is checked exactly)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """What `TrackedLedger.check` looked at (returned when every invariant holds)."""

    length: int
    """Entries in storage."""
    appended: int
    """Entries committed while this ledger was open (length minus the entries it found)."""
    acknowledged: int
    """Records whose append returned a receipt."""
    failed: int
    """Records whose append raised an error (none of them stored)."""
    cancelled: int
    """Records whose append was cancelled."""
    cancelled_stored: int
    """Of those (and of the indeterminate ones), how many were stored anyway (allowed)."""
    indeterminate: int = 0
    """Records whose append failed with storage unable to tell whether they were stored."""
    watched: tuple[str, ...]
    """Modules whose deliveries were checked (they have a probe or fault-plan log)."""
    complete: tuple[str, ...]
    """Watched modules checked to have received every committed entry."""
    waived: Mapping[str, str] = field(default_factory=dict)
    """Watched modules spared the every-entry check, with the reason (they were allowed to
    miss entries: the ledger failed, they crashed while it stopped, they are TEMPORARY, ...)."""
    stop: StopReport | None = None
    """The timed stop, if the ledger was stopped while this object watched it."""


class InvariantViolation(NucleusError, AssertionError):
    """An invariant of the runtime does not hold; `violations` lists every one found.

    Attributes:
        violations: one sentence per broken invariant (which rule, which seq/module, values).
        report: what the check looked at.
    """

    def __init__(self, violations: Sequence[str], report: CheckReport) -> None:
        self.violations = list(violations)
        self.report = report
        shown = "\n".join(f"  - {v}" for v in self.violations[:_SHOWN])
        more = len(self.violations) - _SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.violations)} invariant violation(s):\n{shown}{tail}")


@dataclass(slots=True, kw_only=True)
class _Watch:
    module_id: str
    restart: Restart
    shutdown: float | None
    overflow: Overflow
    since: int | None  # first seq it must receive; None = the first committed this session
    logs: list[CallbackLog]
    controlled: bool = False  # terminated/restarted/removed by the test
    durable: bool = False  # catches up from its position: its first delivery may be earlier
    from_start: bool = True  # durable with start_at="start" (else "end": it may start later)
    owns_position: bool = False  # durable with resume_after (its store may be ahead)


async def _noop(module: Module) -> None:
    await trio.lowlevel.checkpoint()


def _indeterminate(error: BaseException | None) -> bool:
    return isinstance(error, CommitUnknown)


def _down(handle: ModuleHandle[Any]) -> bool:
    return handle.state in (ModuleState.STOPPED, ModuleState.FAILED)


def _is_mock_clock() -> bool:
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


class TrackedLedger(LedgerEngine):
    """A `LedgerEngine` that records every append and every module it runs, then checks them.

    Use it exactly like a `LedgerEngine` (or through `open_tracked_ledger`); after the ledger
    is closed (or at a quiet moment while it runs), `await ledger.check()` raises
    `InvariantViolation` listing every broken invariant (see the module docstring).

    Each appended record gets one meta item, `TAG_KEY: "<n>"`, so that appends can be told
    apart in storage; pass `tag=False` if your modules must see records unchanged (the check
    then counts entries instead of matching them).

    Args:
        config: the ledger's configuration.
        storage: the backend (`MemoryStorage` by default).
        tag: tag records with `TAG_KEY` [True].
    """

    def __init__(
        self, config: LedgerConfig, storage: StorageBackend | None = None, *, tag: bool = True
    ) -> None:
        super().__init__(config, storage)
        self.tag = tag
        self.calls: list[AppendCall] = []
        """Every finished append/append_many call, in the order they ended."""
        self.stop_report: StopReport | None = None
        """Set when the ledger stopped (`stop_all`, or leaving the block while running)."""
        self._pending = 0
        self._tags = itertools.count()
        self._start_length = 0
        self._watch: dict[str, _Watch] = {}
        self._closed = False

    def __repr__(self) -> str:
        return super().__repr__().replace("<LedgerEngine", "<TrackedLedger", 1)

    # -- registration ----------------------------------------------------------------------
    def watch(self, module_id: str, log: CallbackLog) -> None:
        """Also check module `module_id`'s deliveries against `log` (a log it writes to).

        Probes and plan-wrapped modules are watched automatically when registered here.

        Raises:
            KeyError: no module with that id was registered through this ledger.
        """
        self._watch[module_id].logs.append(log)

    def _remember(
        self, module: Any, options: Mapping[str, Any], handle: ModuleHandle[Any], since: int | None
    ) -> None:
        spec = module if isinstance(module, ModuleSpec) else ModuleSpec(module)
        restart = Restart(options.get("restart", spec.restart))
        shutdown = options.get("shutdown", spec.shutdown)
        overflow = handle._child.overflow
        target = spec.module
        logs = [plan.log for plan in plans_of(target)]
        if isinstance(target, Probe):
            logs.append(target.log)
        else:
            own = getattr(target, _LOGS_ATTR, None)
            if not isinstance(target, Module) and isinstance(own, CallbackLog):
                logs.append(own)  # Probe.factory()
        child = handle._child
        self._watch[handle.id] = _Watch(
            module_id=handle.id,
            restart=restart,
            shutdown=shutdown,
            overflow=overflow,
            since=since,
            logs=logs,
            durable=child.durable,
            from_start=child.spec.start_at == "start",
            owns_position=child.owns_position,
        )

    @overload
    def register(self, module: ModuleSpec[M], /, **options: Any) -> ModuleHandle[M]: ...

    @overload
    def register(self, module: M | Callable[[], M], /, **options: Any) -> ModuleHandle[M]: ...

    def register(self, module: Any, /, **options: Any) -> ModuleHandle[Any]:
        """`LedgerEngine.register`, remembering the module's spec and logs for `check`."""
        handle = super().register(module, **options)
        self._remember(module, options, handle, None)
        return handle

    @overload
    async def add(self, module: ModuleSpec[M], /, **options: Any) -> ModuleHandle[M]: ...

    @overload
    async def add(self, module: M | Callable[[], M], /, **options: Any) -> ModuleHandle[M]: ...

    async def add(self, module: Any, /, **options: Any) -> ModuleHandle[Any]:
        """`LedgerEngine.add`, remembering the module (it must see every later entry)."""
        handle = await super().add(module, **options)
        self._remember(module, options, handle, self.state.length)
        return handle

    def _controlled(self, module_id: str) -> None:
        watch = self._watch.get(module_id)
        if watch is not None:
            watch.controlled = True

    async def terminate(self, module_id: str) -> None:
        """`LedgerEngine.terminate` (the module is then spared the every-entry check)."""
        self._controlled(module_id)
        await super().terminate(module_id)

    async def restart(self, module_id: str) -> None:
        """`LedgerEngine.restart` (the module is then spared the every-entry check)."""
        self._controlled(module_id)
        await super().restart(module_id)

    async def remove(self, module_id: str) -> None:
        """`LedgerEngine.remove` (the module is then spared the every-entry check)."""
        self._controlled(module_id)
        await super().remove(module_id)

    # -- appends ---------------------------------------------------------------------------
    def _tagged(self, record: Record) -> tuple[Record, str | None]:
        if not self.tag:
            return record, None
        tag = str(next(self._tags))
        return record.with_meta({TAG_KEY: tag}), tag

    def _finish(
        self,
        records: Sequence[tuple[Record, str | None]],
        receipts: Sequence[Receipt] | None,
        error: BaseException | None,
    ) -> None:
        cancelled = error is not None and not isinstance(error, Exception)
        self.calls.append(
            AppendCall(
                records=tuple(r for r, _ in records),
                tags=tuple(t for _, t in records),
                receipts=None if receipts is None else tuple(receipts),
                error=error,
                cancelled=cancelled,
                indeterminate=_indeterminate(error),
            )
        )

    async def append(self, record: Record, *, idempotency_key: str | None = None) -> Receipt:
        """`LedgerEngine.append`, recording the call and its outcome (same errors)."""
        submitted: object = record
        if not isinstance(submitted, Record):
            return await super().append(record)  # raises InvalidRecord
        item = self._tagged(submitted)
        self._pending += 1
        try:
            receipt = await super().append(item[0], idempotency_key=idempotency_key)
        except BaseException as exc:
            self._finish([item], None, exc)
            raise
        finally:
            self._pending -= 1
        self._finish([item], [receipt], None)
        return receipt

    async def append_many(
        self, records: Iterable[Record], *, idempotency_key: str | None = None
    ) -> list[Receipt]:
        """`LedgerEngine.append_many`, recording the call and its outcome (same errors)."""
        batch = list(records)
        if not all(isinstance(r, Record) for r in batch):
            return await super().append_many(batch)  # raises InvalidRecord
        items = [self._tagged(r) for r in batch]
        self._pending += 1
        try:
            receipts = await super().append_many(
                [r for r, _ in items], idempotency_key=idempotency_key
            )
        except BaseException as exc:
            self._finish(items, None, exc)
            raise
        finally:
            self._pending -= 1
        self._finish(items, receipts, None)
        return receipts

    async def wait_delivered(self) -> None:
        """Wait until every running module has handled every delivery queued before this call.

        Sends each module a no-op `ask`, which queues behind its deliveries and survives its
        restarts. Modules that are (or become) STOPPED or FAILED are skipped.

        Cancellation: just stops waiting.

        Raises:
            ModuleError: a module that is still running failed to answer (e.g. its `ask`
                timed out).
        """
        for handle in list(self.modules):
            if _down(handle):
                continue
            try:
                await handle.ask(_noop)
            except ModuleError:
                if _down(handle):
                    continue
                raise

    # -- stopping --------------------------------------------------------------------------
    def _stop_bound(self, cap: float | None, in_flight: int) -> float | None:
        limits: list[float] = []
        for handle in self.modules:
            watch = self._watch.get(handle.id)
            shutdown = watch.shutdown if watch is not None else None
            limit = cap if shutdown is None else shutdown
            if limit is None:
                return None
            limits.append(limit)
        # In-flight appends: the stop waits while each batch makes progress, giving up after
        # the longest shutdown without progress (checked at least every 0.1 s); then each
        # module drains and stops within its own shutdown.
        longest = max(limits, default=0.0)
        return (in_flight + 1) * max(longest, 0.1) + sum(limits)

    async def _timed(self, stop: Callable[[], Any], cap: float | None) -> Any:
        if self.phase not in (Phase.INITIALIZED, Phase.RUNNING):
            return await stop()
        bound = self._stop_bound(cap, self._pending)
        started = trio.current_time()
        try:
            return await stop()
        finally:
            if self.stop_report is None:
                self.stop_report = StopReport(
                    elapsed=trio.current_time() - started,
                    bound=bound,
                    mock_clock=_is_mock_clock(),
                )

    async def stop_all(self) -> None:
        """`LedgerEngine.stop_all`, timed (see `stop_report`)."""
        await self._timed(super().stop_all, None)

    async def __aenter__(self) -> TrackedLedger:
        await super().__aenter__()
        self._start_length = self.state.length
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        cancelled = exc is not None and not isinstance(exc, Exception)
        cap = self.config.exit_timeout if cancelled else None
        try:
            result: bool | None = await self._timed(
                lambda: super(TrackedLedger, self).__aexit__(exc_type, exc, tb), cap
            )
            return result
        finally:
            self._closed = True

    # -- checking --------------------------------------------------------------------------
    async def _stored(self, violations: list[str]) -> list[Entry]:
        """Verify and read every stored entry: through this engine while it is open, through
        a fresh engine on the same storage once it is closed (what a restart would find)."""
        if not self._closed:
            return await self._verify_and_read(self, violations)
        fresh = LedgerEngine(self.config, self.storage)
        async with fresh:
            entries = await self._verify_and_read(fresh, violations)
            found = fresh.state
        mine = self.state
        # After an append storage could not confirm, the engine may not know that it landed:
        # then storage may hold more (the tag check still accounts for every entry).
        unsure = any(call.indeterminate for call in self.calls)
        if unsure and found.length > mine.length:
            pass
        elif (found.length, found.head) != (mine.length, mine.head):
            violations.append(
                f"storage holds {found.length} entries (head {found.head.hex()[:16]}) but the "
                f"ledger committed {mine.length} (head {mine.head.hex()[:16]})"
            )
        return entries

    @staticmethod
    async def _verify_and_read(engine: LedgerEngine, violations: list[str]) -> list[Entry]:
        try:
            await engine.verify()
        except IntegrityError as exc:
            violations.append(f"the chain does not verify: {exc} (seq {exc.seq})")
        entries: list[Entry] = []
        try:
            async for entry in engine.read(0):
                entries.append(entry)
        except IntegrityError as exc:
            violations.append(f"stored entry {exc.seq} cannot be read: {exc}")
        return entries

    async def check(self) -> CheckReport:
        """Check every invariant (module docstring); return what was checked.

        Call it after the ledger is closed (the usual way: `open_tracked_ledger` does it on
        exit), or while it runs with no append in flight. Every violation is collected before
        raising, so one run shows everything that went wrong.

        Cancellation: nothing to undo.

        Raises:
            InvariantViolation: at least one invariant does not hold.
        """
        violations: list[str] = []
        entries = await self._stored(violations)
        start = self._start_length
        if self._pending and self._closed:
            violations.append(f"{self._pending} append call(s) never returned")
        counts = self._check_appends(entries, start, violations)
        watched, complete, waived = self._check_deliveries(entries, start, violations)
        stop = self.stop_report
        if self._closed:
            self._check_stop(stop, violations)
        report = CheckReport(
            length=len(entries),
            appended=len(entries) - start,
            acknowledged=counts[0],
            failed=counts[1],
            cancelled=counts[2],
            cancelled_stored=counts[3],
            indeterminate=counts[4],
            watched=tuple(watched),
            complete=tuple(complete),
            waived=waived,
            stop=stop,
        )
        if violations:
            raise InvariantViolation(violations, report)
        return report

    def _check_appends(
        self, entries: list[Entry], start: int, violations: list[str]
    ) -> tuple[int, int, int, int, int]:
        acked: dict[str, Receipt] = {}
        failed: dict[str, BaseException] = {}
        cancelled: set[str] = set()
        n_acked = n_failed = n_cancelled = n_unknown = 0
        for call in self.calls:
            if call.receipts is not None:
                n_acked += len(call.records)
                for index, (receipt, tag) in enumerate(zip(call.receipts, call.tags, strict=True)):
                    self._check_receipt(entries, receipt, call.records[index], violations)
                    if tag is not None:
                        acked[tag] = receipt
            elif call.cancelled or call.indeterminate:
                if call.cancelled:
                    n_cancelled += len(call.records)
                else:
                    n_unknown += len(call.records)
                cancelled.update(t for t in call.tags if t is not None)
            else:
                n_failed += len(call.records)
                assert call.error is not None
                failed.update((t, call.error) for t in call.tags if t is not None)
        stored_cancelled = 0
        if not self.tag:
            extra = len(entries) - start - n_acked
            unknown = n_cancelled + n_unknown
            if extra > unknown:
                violations.append(
                    f"{len(entries) - start} entries were stored but only {n_acked} appends "
                    f"were acknowledged and {unknown} cancelled or indeterminate: "
                    f"{extra - unknown} failed append(s) were stored"
                )
            stored_cancelled = max(0, min(extra, unknown))
            return n_acked, n_failed, n_cancelled, stored_cancelled, n_unknown
        where: dict[str, int] = {}
        for entry in entries[start:]:
            tag = entry.record.meta.get(TAG_KEY)
            if tag is None:
                violations.append(
                    f"entry {entry.seq} has no {TAG_KEY!r} meta: it was not appended through "
                    "this TrackedLedger, or a before_append dropped the meta item"
                )
                continue
            if tag in where:
                violations.append(
                    f"append #{tag} is stored twice: at seq {where[tag]} and at seq {entry.seq}"
                )
                continue
            where[tag] = entry.seq
            if tag in failed:
                violations.append(
                    f"entry {entry.seq} is stored although its append failed with {failed[tag]!r}"
                )
            elif tag in cancelled:
                stored_cancelled += 1
            elif tag not in acked:
                violations.append(f"entry {entry.seq} (append #{tag}) was never appended")
        for tag, receipt in acked.items():
            if where.get(tag, receipt.seq) != receipt.seq:
                violations.append(
                    f"append #{tag} was acknowledged at seq {receipt.seq} but is stored at "
                    f"seq {where[tag]}"
                )
        return n_acked, n_failed, n_cancelled, stored_cancelled, n_unknown

    @staticmethod
    def _check_receipt(
        entries: list[Entry], receipt: Receipt, record: Record, violations: list[str]
    ) -> None:
        if not 0 <= receipt.seq < len(entries):
            violations.append(
                f"acknowledged receipt seq={receipt.seq} hash={receipt.hash.hex()[:16]} is not "
                f"stored (storage holds {len(entries)} entries)"
            )
            return
        entry = entries[receipt.seq]
        if entry.hash != receipt.hash:
            violations.append(
                f"entry {receipt.seq} is stored with hash {entry.hash.hex()[:16]}, the receipt "
                f"said {receipt.hash.hex()[:16]}"
            )
        if entry.timestamp != receipt.timestamp:
            violations.append(
                f"entry {receipt.seq} is stored with timestamp {entry.timestamp}, the receipt "
                f"said {receipt.timestamp}"
            )
        tag = record.meta.get(TAG_KEY)
        stored = entry.record.meta.get(TAG_KEY)
        if tag is not None and stored is not None and stored != tag:
            violations.append(
                f"entry {receipt.seq} holds append #{stored}, its "
                f"receipt was given to append #{tag}"
            )

    def _check_deliveries(
        self, entries: list[Entry], start: int, violations: list[str]
    ) -> tuple[list[str], list[str], dict[str, str]]:
        statuses = {s.id: s for s in self.modules.status()}
        watched: list[str] = []
        complete: list[str] = []
        waived: dict[str, str] = {}
        for module_id, watch in self._watch.items():
            for log in watch.logs:
                if not log.of(module_id):
                    continue
                if module_id not in watched:
                    watched.append(module_id)
                handled = self._check_order(watch, log, entries, start, violations)
                reason = self._waiver(watch, log, statuses.get(module_id))
                if reason is not None:
                    waived[module_id] = reason
                    continue
                since = start if watch.since is None else watch.since
                missing = [seq for seq in range(since, len(entries)) if seq not in handled]
                if missing:
                    shown = ", ".join(map(str, missing[:10]))
                    violations.append(
                        f"module {module_id!r} never received {len(missing)} committed "
                        f"entr{'y' if len(missing) == 1 else 'ies'} (seq {shown}"
                        f"{', ...' if len(missing) > 10 else ''})"
                    )
                if module_id not in complete:
                    complete.append(module_id)
        return watched, complete, waived

    @staticmethod
    def _check_order(
        watch: _Watch, log: CallbackLog, entries: list[Entry], start: int, violations: list[str]
    ) -> set[int]:
        module_id = watch.module_id
        # BLOCK and CATCH_UP (durable) deliver every entry in order, with no gap.
        strict = watch.overflow in (Overflow.BLOCK, Overflow.CATCH_UP) and not watch.controlled
        handled: set[int] = set()
        prev: CallbackEvent | None = None
        for event in log.of(module_id, Callback.AFTER_APPEND):
            seq = event.seq
            where = f"module {module_id!r} (incarnation {event.incarnation})"
            if seq is None or not 0 <= seq < len(entries):
                violations.append(f"{where} got seq {seq}, which is not in storage")
                continue
            stored = entries[seq]
            if event.hash != stored.hash:
                violations.append(f"{where} got seq {seq} with a hash that is not the stored one")
            if event.record is not None and event.record.meta.get(
                TAG_KEY
            ) != stored.record.meta.get(TAG_KEY):
                violations.append(f"{where} got seq {seq} with another record than the stored one")
            if event.handled:
                handled.add(seq)
            expected: int | None = None
            also: int | None = None  # a second seq allowed where `expected` is
            if prev is None:
                first = start if watch.since is None else watch.since
                if watch.durable:
                    # It catches up from its position (a stored cursor, resume_after, or seq 0
                    # for start_at="start"), at or before the first entry of this session: no
                    # gap. With start_at="end" and no position it may begin later.
                    if watch.from_start and seq > first:
                        violations.append(
                            f"{where} got seq {seq} first: a durable module resumes at its "
                            f"position + 1, at most seq {first} here (a gap)"
                        )
                elif watch.since is None:
                    expected = start
            elif event.incarnation == prev.incarnation:
                if prev.outcome is not CallOutcome.RETURNED:
                    violations.append(
                        f"{where} got seq {seq} after its delivery of seq {prev.seq} "
                        f"{prev.outcome.value}, in the same incarnation"
                    )
                expected = None if prev.seq is None else prev.seq + 1
            elif prev.seq is not None:
                # The delivery a module crashed on comes first in its next incarnation.
                redelivered = prev.outcome is not CallOutcome.RETURNED
                expected = prev.seq if redelivered else prev.seq + 1
                if redelivered and prev.handled and watch.owns_position:
                    # Its own store recorded that delivery before the crash (a fault at exit):
                    # resume_after says so, and it resumes after it.
                    also = prev.seq + 1
            if expected is not None and seq != also:
                wrong = seq != expected if strict else seq < expected
                if wrong and prev is not None and event.incarnation != prev.incarnation:
                    what = "redelivery of" if prev.outcome is not CallOutcome.RETURNED else ""
                    violations.append(
                        f"{where} got seq {seq} first, expected {what} seq {expected} "
                        f"(incarnation {prev.incarnation} ended on seq {prev.seq}, "
                        f"{prev.outcome.value})".replace("expected  ", "expected ")
                    )
                elif wrong:
                    violations.append(f"{where} got seq {seq}, expected seq {expected} (in order)")
            prev = event
        return handled

    def _waiver(self, watch: _Watch, log: CallbackLog, status: ModuleStatus | None) -> str | None:
        """Why a module may have missed committed entries, or None if it must have them all."""
        if not self._closed:
            return "the ledger is still open (deliveries may be queued)"
        if self.phase is Phase.FAILED:
            return "the ledger failed (escalation stops delivery)"
        if status is None:
            return "removed"
        if watch.controlled:
            return "terminated, restarted or removed by the test"
        if watch.restart is Restart.TEMPORARY:
            return "TEMPORARY (may be stopped for good by a crash or a group restart)"
        hooks = log.hooks(watch.module_id)
        if hooks is not None and Callback.AFTER_APPEND not in hooks:
            return "it has no after_append"
        if watch.overflow is Overflow.CATCH_UP:
            if status.lag:
                return f"durable and {status.lag} behind at close (it catches up on its next start)"
        elif watch.overflow is not Overflow.BLOCK:
            return f"overflow={watch.overflow.value} drops deliveries"
        if status.stop_result not in ("clean", "error"):
            return f"it ended {status.state.name} (stop_result={status.stop_result})"
        events = log.of(watch.module_id)
        if events:
            last = max(e.incarnation for e in events)
            for e in events:
                if (
                    e.incarnation == last
                    and e.callback is not Callback.STOP
                    and e.outcome in (CallOutcome.RAISED, CallOutcome.CANCELLED)
                    and not (
                        e.callback is Callback.BACKGROUND and e.outcome is CallOutcome.CANCELLED
                    )
                ):
                    return (
                        f"its last incarnation ({last}) crashed in {e.callback.value} "
                        "while the ledger stopped (a crash then restarts nothing)"
                    )
        return None

    def _check_stop(self, stop: StopReport | None, violations: list[str]) -> None:
        if self.phase not in (Phase.STOPPED, Phase.FAILED):
            violations.append(f"the ledger is {self.phase.name} after closing")
        for status in self.modules.status():
            # REGISTERED: never started (a startup that failed before reaching it).
            if status.state not in (
                ModuleState.STOPPED,
                ModuleState.FAILED,
                ModuleState.REGISTERED,
            ):
                violations.append(
                    f"module {status.id!r} is {status.state.name} after the ledger closed"
                )
        if stop is None or stop.bound is None:
            return
        slack = 0.0 if stop.mock_clock else 1.0
        if stop.elapsed > stop.bound + slack + 1e-9:
            violations.append(
                f"stopping took {stop.elapsed:.3f} s, over the {stop.bound:.3f} s its modules' "
                "shutdown deadlines allow"
            )


@asynccontextmanager
async def open_tracked_ledger(
    config: LedgerConfig | None = None,
    *,
    storage: StorageBackend | None = None,
    modules: Sequence[Module | Callable[[], Module] | ModuleSpec[Any]] = (),
    check: bool = True,
    tag: bool = True,
) -> AsyncIterator[TrackedLedger]:
    """Like `open_ledger`, with a `TrackedLedger` whose invariants are checked on exit.

    Registers `modules`, runs `init_all` and `start_all`, yields the running ledger. Leaving
    the block stops it (timed); then, if `check`, `check()` runs: when the block ended
    normally or by escalation (`LedgerFailed`, re-raised after the check). A block that raised
    anything else is not checked, so its own error shows.

    Args:
        config: [`LedgerConfig(ledger_id="test")`].
        storage: [`MemoryStorage()`].
        modules: modules, factories or `ModuleSpec`s, as for `open_ledger`.
        check: run `check()` on exit [True].
        tag: tag records (see `TrackedLedger`) [True].

    Raises:
        InvariantViolation: on exit, an invariant does not hold.
        LedgerFailed: the supervisor escalated (after the check passed).
        ModuleError: startup failed (nothing is checked).
    """
    ledger = TrackedLedger(config or LedgerConfig(ledger_id="test"), storage, tag=tag)
    for module in modules:
        ledger.register(module)
    failure: LedgerFailed | None = None
    try:
        async with ledger:
            await ledger.init_all()
            await ledger.start_all()
            yield ledger
    except LedgerFailed as exc:
        failure = exc
    if check:
        try:
            await ledger.check()
        except InvariantViolation as violation:
            raise violation from failure
    if failure is not None:
        raise failure
