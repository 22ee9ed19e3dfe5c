"""`LedgerEngine` and `open_ledger`: a ledger, its storage, its modules and its supervisor.

```python
async with LedgerEngine(LedgerConfig(ledger_id="orders")) as engine:
    engine.register(Audit())
    await engine.init_all()
    await engine.start_all()
    receipt = await engine.append(Record("order.created", {"id": 7}))
```

The engine owns a trio nursery (opened by `async with`) in which every module actor, the append
pipeline and the supervisor run. Leaving the block stops everything (see `__aexit__`).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, NoReturn, TypeVar, overload

import trio

from ._groups import leaves
from ._instrument import Instrument
from ._pipeline import Pipeline, Request
from ._stall import StallWatchdog
from ._supervisor import Supervisor
from ._transitions import PhaseEvent
from ._tree import LedgerTree
from .config import LedgerConfig
from .errors import (
    Fenced,
    IdempotencyConflict,
    IntegrityError,
    InvalidRecord,
    LedgerFailed,
    LifecycleError,
    NucleusError,
    StorageError,
)
from .hashing import ChainVerifier, genesis
from .lifecycle import LedgerState, Phase
from .module._base import Module
from .module._context import LedgerReader
from .module._spec import ModuleSpec
from .proofs import ConsistencyProof, InclusionProof
from .record import Entry, Hash, Receipt, Record, committed_bytes
from .registry import ModuleHandle, ModuleRegistry, Statistics, _handle
from .storage import (
    CursorStore,
    IdempotencyStore,
    MemoryStorage,
    StorageBackend,
    check_contract,
    require_capability,
)
from .storage._base import TreeStore

__all__ = ["LedgerEngine", "open_ledger"]

M = TypeVar("M", bound=Module)
C = TypeVar("C")

_DRAIN_SLICE = 0.1  # how often the stop drain checks that the pipeline still makes progress


async def _close(iterator: AsyncIterator[Entry]) -> None:
    """Close an iterator that needs it (an async generator), shielded."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with trio.CancelScope(shield=True):
            await aclose()


async def _first(iterator: AsyncIterator[Entry]) -> Entry | None:
    """The first item of a storage read (or None), closing the iterator."""
    try:
        async for entry in iterator:
            return entry
        return None
    finally:
        await _close(iterator)


class _ReadOnlyLedger:
    """`ctx.ledger`: what a module may do with its ledger (read, never write)."""

    __slots__ = ("_engine",)

    def __init__(self, engine: LedgerEngine) -> None:
        self._engine = engine

    @property
    def state(self) -> LedgerState:
        return self._engine.state

    async def get(self, seq: int) -> Entry:
        return await self._engine.get(seq)

    def read(self, start: int = 0, stop: int | None = None) -> AsyncIterator[Entry]:
        return self._engine.read(start, stop)

    async def verify(self) -> Hash:
        return await self._engine.verify()

    async def root(self, size: int | None = None) -> Hash:
        return await self._engine.root(size)

    async def inclusion_proof(self, seq: int, size: int | None = None) -> InclusionProof:
        return await self._engine.inclusion_proof(seq, size)

    async def consistency_proof(
        self, old_size: int, new_size: int | None = None
    ) -> ConsistencyProof:
        return await self._engine.consistency_proof(old_size, new_size)


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, (trio.Cancelled, KeyboardInterrupt))


def _unwrap(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise what a nursery group carries, unwrapped when it is one error (trio >= 0.25 always
    groups). A LedgerFailed wins; a group of several errors is raised as it is."""
    found = leaves(group)
    failed = [e for e in found if isinstance(e, LedgerFailed)]
    errors = [e for e in found if not isinstance(e, trio.Cancelled)]
    if not errors:
        raise group  # only cancellations: trio's cancel scopes know what to do with them
    # KeyboardInterrupt/SystemExit first, then the ledger's own failure, then the first error.
    fatal = [e for e in errors if not isinstance(e, Exception)]
    chosen = fatal[0] if fatal else failed[0] if failed else errors[0]
    for other in errors:
        if other is not chosen:
            chosen.add_note(f"(also raised while the ledger closed: {other!r})")
    raise chosen from chosen.__cause__


def _wrong_loop() -> Exception:
    """The error for a ledger opened outside trio (asyncio's "Task got bad yield" otherwise)."""
    from .errors import EventLoopError  # imported here: keeps this addition self-contained

    try:
        import sniffio

        where = f" (called from {sniffio.current_async_library()})"
    except Exception:  # sniffio missing or no known library: say nothing more
        where = ""
    return EventLoopError(
        f"nucleus_actors runs on trio; from asyncio use nucleus_actors.aio.open_ledger{where}"
    )


def _checked_record(record: object, suffix: int, limit: int, takes: str) -> Record | InvalidRecord:
    """`record` if it may be appended, else the `InvalidRecord` that says why.

    Args:
        record: whatever the caller passed.
        suffix: bytes its body gains at commit (`LedgerEngine._commit_suffix`).
        limit: `max_record_bytes`.
        takes: the start of the message for a non-Record ("append_each takes Records").
    """
    if not isinstance(record, Record):
        return InvalidRecord(f"{takes}, got {type(record).__name__}")
    size = len(record._body) + suffix
    if size > limit:
        return InvalidRecord(f"record is {size} canonical bytes, over max_record_bytes={limit}")
    return record


async def _wait_requests(slots: Sequence[object]) -> None:
    """Wait until every `Request` among `slots` is answered. A checkpoint.

    A batch answers all its requests at once, so this waits only for those not answered yet:
    one wakeup per batch, not one per record. Cancellation: the requests not yet handed to
    storage are withdrawn (never stored); those being stored still commit.
    """
    try:
        waited = False
        for slot in slots:
            if isinstance(slot, Request) and not slot.done:
                await slot._wait()
                waited = True
        if not waited:
            await trio.lowlevel.checkpoint()
    except BaseException:
        for slot in slots:
            if isinstance(slot, Request) and not slot.storing:
                slot.withdrawn = True
        raise


class LedgerEngine:
    """One ledger: append-only chained storage, modules run as supervised actors.

    Use it as an async context manager; it can be opened once. Every public coroutine documents
    what cancellation does to it.
    """

    def __init__(self, config: LedgerConfig, storage: StorageBackend | None = None) -> None:
        if not isinstance(config, LedgerConfig):
            raise TypeError(f"LedgerEngine needs a LedgerConfig, got {type(config).__name__}")
        self.config = config
        self.storage: StorageBackend = MemoryStorage() if storage is None else storage
        self._ledger_reader: LedgerReader = _ReadOnlyLedger(self)
        self._supervisor = Supervisor(self)
        self._registry = self._supervisor.registry_view
        self._pipeline = Pipeline(self)
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._used = False
        self._open = False
        self._keys_in_flight: set[str] = set()  # idempotency keys of appends not yet answered
        self._transition: str | None = None
        self._transition_done = trio.Event()
        self._failure: LedgerFailed | None = None
        self._chain = self._pipeline.chain  # length, head, last timestamp: the pipeline's
        self._tree: LedgerTree | None = None  # the Merkle tree (None: not kept)
        self.fenced: Fenced | None = None
        """Set when storage refused a batch because another writer holds the ledger (a newer
        fencing epoch, see `PostgresStorage`): the engine stopped writing and failed with
        `LedgerFailed` caused by this error."""

    def __repr__(self) -> str:
        length = self._chain.length
        return f"<LedgerEngine {self.config.ledger_id!r} {self.phase.name} length={length}>"

    # -- state -----------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        """Current lifecycle phase."""
        return self._supervisor.phase

    def _phase_changed(self, phase: Phase) -> None:
        if phase in (Phase.STOPPED, Phase.FAILED):
            self._grew()  # waiters learn that it will not grow

    @property
    def state(self) -> LedgerState:
        """Snapshot: phase, length, head hash."""
        return LedgerState(self.phase, self._chain.length, self._chain.head)

    @property
    def modules(self) -> ModuleRegistry:
        """The module registry: `get`, iteration in start order, `status()`, `counts()`."""
        return self._registry

    def append_stalled_for(self) -> float:
        """Seconds appends have been waiting without the pipeline finishing a batch; 0.0 when
        no append is waiting or in progress. A large value means something holds every
        append back (e.g. a module's `after_append` hangs with `timeout=None` and its
        inbox is full under `Overflow.BLOCK`)."""
        pipeline = self._pipeline
        if not pipeline._queue and not pipeline._current:
            return 0.0
        return max(0.0, trio.current_time() - pipeline.progressed_at)

    def statistics(self) -> Statistics:
        """Counters: committed appends, rejects, crashes, restarts."""
        supervisor, pipeline = self._supervisor, self._pipeline
        return Statistics(
            appends=pipeline.appends,
            rejects=pipeline.rejects,
            crashes=supervisor.crashes,
            restarts=supervisor.restarts,
        )

    async def wait_phase(self, phase: Phase, *more: Phase) -> Phase:
        """Wait until the ledger is in one of the given phases; return it.

        Cancellation: just stops waiting.
        """
        wanted = {phase, *more}
        if self.phase in wanted:
            await trio.lowlevel.checkpoint()
            return self.phase
        value: Phase = await self._supervisor.phases.value.wait_value(lambda p: p in wanted)
        return value

    async def wait_length(self, length: int) -> int:
        """Wait until the ledger holds at least `length` entries; return its length then.

        Use it to follow a ledger (`await engine.wait_length(state.length + 1)` wakes on the
        next commit, whoever appended it). Returns at once (after a checkpoint) if it already
        does. Cancellation: just stops waiting.

        Raises:
            LifecycleError: the engine closed, or the ledger stopped or failed, before that.
            ValueError: `length` is not an int >= 0.
        """
        if type(length) is not int or length < 0:
            raise ValueError(f"wait_length needs an int >= 0, got {length!r}")
        await trio.lowlevel.checkpoint()
        while self._chain.length < length:
            if not self._open or self.phase in (Phase.STOPPED, Phase.FAILED):
                raise LifecycleError(
                    f"ledger {self.config.ledger_id!r} will not grow: it is {self.phase.name} "
                    f"with {self._chain.length} entries (waited for {length})",
                    phase=self.phase,
                )
            await self._chain.lot.park()
        return self._chain.length

    def _grew(self) -> None:
        """Wake `wait_length` waiters (when the ledger stops; the pipeline wakes them on a
        commit)."""
        self._chain.wake()

    def require_storage(self, capability: Callable[..., C], feature: str) -> C:
        """The ledger's storage as `capability` (`CursorStore`, `TreeStore`,
        `IdempotencyStore`), or a clear error when the backend lacks it.

        Features that store more than entries call it when they are used (registering a
        durable module, asking for a proof, an idempotent append).

        Raises:
            StorageError: the backend lacks the capability (naming the backend, the capability
                and `feature`, e.g. "register durable module 'audit'").
        """
        return require_capability(self.storage, capability, feature)

    @property
    def _module_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise self._not_open("run modules")
        return self._nursery

    def _escalated(self, failure: LedgerFailed) -> None:
        """Called by the supervisor once every module is stopped: end the block."""
        self._failure = failure
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _not_open(self, what: str) -> LifecycleError:
        state = "closed" if self._used and not self._open else "not open"
        return LifecycleError(
            f"cannot {what}: ledger {self.config.ledger_id!r} engine is {state} "
            "(use `async with engine:`)",
            phase=self.phase,
        )

    def _require(self, what: str, *allowed: Phase) -> None:
        phase = self.phase
        if phase not in allowed:
            needs = " or ".join(p.name for p in allowed)
            raise LifecycleError(
                f"cannot {what}: ledger {self.config.ledger_id!r} is {phase.name} "
                f"({what} needs {needs})",
                phase=phase,
            )

    # -- context manager -------------------------------------------------------------------
    async def __aenter__(self) -> LedgerEngine:
        """Open storage and the ledger's nursery.

        Raises:
            EventLoopError: not called from a trio task (e.g. under asyncio).
            LifecycleError: the engine was already opened once.
            StorageError: the storage cannot be opened (lock held, other ledger, ...), or it
                implements another storage contract than v2 (`check_contract`).
        """
        if not trio.lowlevel.in_trio_task():
            raise _wrong_loop()
        if self._used:
            raise LifecycleError(
                f"ledger {self.config.ledger_id!r} engine was already opened; an engine is "
                "opened once (create a new LedgerEngine on the same storage to reopen)",
                phase=self.phase,
            )
        self._used = True
        stack = AsyncExitStack()
        await stack.enter_async_context(self._lifetime())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop every module (shielded, bounded), close storage, re-raise unwrapped.

        `stop_all` runs if the ledger is still INITIALIZED or RUNNING, bounded by each
        module's `shutdown`; when leaving by cancellation (or KeyboardInterrupt) a `shutdown`
        of None is capped by `LedgerConfig.exit_timeout`. If the supervisor escalated, this
        raises `LedgerFailed` (the last crash as its cause).
        """
        assert self._stack is not None
        return await self._stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        storage = self.storage
        check_contract(storage)  # a v1 backend is refused before it is opened
        await storage.open(self.config.ledger_id)
        try:
            chain = self._chain
            chain.length, chain.head = await storage.head()
            if chain.length:
                last = await _first(storage.read(chain.length - 1, chain.length))
                if last is not None:
                    chain.last_ts = last.timestamp
            if isinstance(storage, CursorStore):
                self._supervisor.saved_cursors = await storage.load_cursors()
            self._tree = await self._open_tree()
            failure: BaseException | None = None
            watchdog: StallWatchdog | None = None
            if self.config.stall_warning is not None:
                supervisor = self._supervisor
                watchdog = StallWatchdog(
                    self.config.ledger_id, self.config.stall_warning, lambda: supervisor.order
                )
                watchdog.start()
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self._pipeline.run)
                    await nursery.start(self._supervisor.supervise)
                    nursery.start_soon(self._cursor_flusher)
                    self._open = True
                    try:
                        yield
                    except BaseException as exc:
                        await self._close_down(cancelled=_is_cancellation(exc))
                        raise
                    else:
                        await self._close_down(cancelled=False)
                    finally:
                        # Internal tasks are shielded from outer cancellation: end them here.
                        self._pipeline.cancel()
                        self._supervisor.cancel_supervisor()
                        self._supervisor.kill_all()
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                try:
                    _unwrap(group)
                except BaseException as exc:
                    failure = exc
            finally:
                if watchdog is not None:
                    watchdog.stop()
            if self._failure is not None and (failure is None or isinstance(failure, Exception)):
                # Escalation is the root cause: it wins over what the body saw meanwhile (an
                # append failing because the ledger failed), but not over KeyboardInterrupt.
                if failure is not None and failure is not self._failure:
                    self._failure.add_note(f"(the block also raised {failure!r})")
                failure = self._failure
            if failure is not None:
                raise failure from failure.__cause__
        finally:
            self._open = False
            self._nursery = None
            if self.phase is Phase.CREATED:
                self._supervisor.fire(PhaseEvent.CLOSED)  # closed without ever starting
            self._supervisor.close()
            self._grew()
            with trio.CancelScope(shield=True):
                await storage.close()

    async def _close_down(self, *, cancelled: bool) -> None:
        cap = self.config.exit_timeout if cancelled else None
        with trio.CancelScope(shield=True):
            if self.phase in (Phase.INITIALIZED, Phase.RUNNING):
                await self._stop(cap=cap)
            elif self.phase is Phase.STOPPING:
                with trio.move_on_after(self.config.exit_timeout):
                    await self.wait_phase(Phase.STOPPED, Phase.FAILED)
            self._supervisor.kill_all()

    # -- lifecycle -------------------------------------------------------------------------
    @overload
    def register(self, module: ModuleSpec[M], /, **options: Any) -> ModuleHandle[M]: ...

    @overload
    def register(self, module: M | Callable[[], M], /, **options: Any) -> ModuleHandle[M]: ...

    def register(self, module: Any, /, **options: Any) -> ModuleHandle[Any]:
        """Register a module (instance, zero-argument factory or `ModuleSpec`).

        Options are the `ModuleSpec` fields: `restart`, `shutdown`, `timeout`, `inbox`,
        `overflow`, `depends_on`, `config`, `backoff` (they override a spec's).

        Raises:
            LifecycleError: the ledger is past CREATED (use `await engine.add(...)` while
                RUNNING).
            RegistryError: duplicate id, bad id, not a Module, failing factory.
            ValueError / TypeError: an option is out of range or unknown.
        """
        if self.phase is not Phase.CREATED:
            raise LifecycleError(
                f"cannot register: ledger {self.config.ledger_id!r} is {self.phase.name} "
                "(register needs CREATED; use `await engine.add(...)` while RUNNING)",
                phase=self.phase,
            )
        child = self._supervisor.make_child(module, options)
        self._supervisor.add_child(child)
        return _handle(child)

    def _begin(self, what: str, *allowed: Phase) -> None:
        if not self._open:
            raise self._not_open(what)
        if self._transition is not None:
            raise LifecycleError(
                f"cannot {what}: {self._transition} is in progress", phase=self.phase
            )
        self._require(what, *allowed)
        self._transition = what
        self._transition_done = trio.Event()

    def _end_transition(self) -> None:
        self._transition = None
        self._transition_done.set()

    async def init_all(self) -> None:
        """Run every module's `init` in start order (registration order, after dependencies).

        Cancellation: as a failure: the modules initialized so far are stopped in reverse
        order (shielded, bounded) and the ledger ends FAILED.

        Raises:
            RegistryError: unknown dependency or a cycle (nothing ran).
            ModuleError: a module's init failed, naming it (cause chained); every module
                already initialized was stopped in reverse order; the ledger is FAILED.
            LifecycleError: not CREATED, or not inside `async with`.
        """
        self._begin("init_all", Phase.CREATED)
        try:
            await self._supervisor.init_all()
        finally:
            self._end_transition()

    async def start_all(self) -> None:
        """Run every module's `start` in start order; then appends are accepted.

        Cancellation: as a failure (rolled back, ledger FAILED).

        Raises:
            ModuleError: a module's start failed, or a module crashed during startup; every
                module was stopped in reverse order; the ledger is FAILED.
            LifecycleError: not INITIALIZED.
        """
        self._begin("start_all", Phase.INITIALIZED)
        try:
            await self._supervisor.start_all()
        finally:
            self._end_transition()

    async def stop_all(self) -> None:
        """Stop the ledger: refuse new appends, finish those in flight, stop modules.

        New appends fail fast with `LifecycleError`; appends already in flight complete fully
        (stored and delivered) or fail with nothing stored; then every module drains its inbox
        and runs `stop`, in reverse start order, each within its `shutdown` deadline (an actor
        that overstays is cancelled; its status says so). A crash now restarts nothing. No-op
        when already STOPPED or FAILED; waits when another stop is in progress.

        Cancellation: the modules not stopped yet are cancelled at once (their `stop` is not
        called), the ledger ends STOPPED, and the cancellation propagates.
        """
        if self._transition is not None:
            # init_all/start_all in progress (bounded by the modules' timeouts): let it finish,
            # then stop what it started, so the ledger cannot go on to RUNNING afterwards.
            await self._transition_done.wait()
        if self.phase in (Phase.STOPPED, Phase.FAILED):
            await trio.lowlevel.checkpoint()
            return
        if self.phase is Phase.CREATED:
            await trio.lowlevel.checkpoint()
            self._supervisor.fire(PhaseEvent.CLOSED)
            return
        if self.phase is Phase.STOPPING:
            await self.wait_phase(Phase.STOPPED, Phase.FAILED)
            return
        await self._stop(cap=None)

    async def _stop(self, *, cap: float | None) -> None:
        supervisor = self._supervisor
        supervisor.fire(PhaseEvent.STOP)
        try:
            await supervisor.stop_supervising(cap=supervisor.longest_shutdown(cap))
            supervisor.abandon_restarts()
            await self._drain(cap)
            await self._pipeline.settle_unknown()
            await supervisor.stop_all(cap=cap)
            await self._pipeline.flush_cursors()  # durable modules resume from here
        except BaseException:
            await supervisor.abort()  # cancelled: the modules not stopped yet are killed
            raise
        finally:
            supervisor.fire(PhaseEvent.STOPPED)

    async def _cursor_flusher(self) -> None:
        """Store moved cursors on their own at most every `cursor_interval` (they usually
        ride with the next batch); idle while no cursor moves."""
        supervisor = self._supervisor
        while True:
            await supervisor.cursor_dirty.wait()
            await trio.sleep(self.config.cursor_interval)
            await self._pipeline.flush_cursors()

    async def _drain(self, cap: float | None) -> None:
        """Let in-flight appends finish while every module still runs.

        It waits as long as the pipeline makes progress or is writing to storage. It gives up
        only when the pipeline has been stuck on modules (a hook, a full BLOCK inbox) for the
        longest module `shutdown`: then stopping the modules (in reverse order, with their
        deadlines) unblocks it, and what cannot complete fails with nothing stored.
        """
        pipeline = self._pipeline
        bound = self._supervisor.longest_shutdown(cap)
        if bound is None:
            await pipeline.wait_idle()
            return
        while True:
            progress = pipeline.batches_done
            with trio.move_on_after(max(bound, _DRAIN_SLICE)):
                await pipeline.wait_idle()
                return
            if pipeline.batches_done == progress and not pipeline.storing:
                return

    # -- instrumentation -------------------------------------------------------------------
    def add_instrument(self, instrument: Instrument) -> None:
        """Observe every callback of every module of this ledger (see `Instrument`).

        Takes effect from each module's next callback; adding it twice is a no-op.

        Raises:
            TypeError: not an `Instrument`.
        """
        if not isinstance(instrument, Instrument):
            raise TypeError(f"add_instrument takes an Instrument, got {type(instrument).__name__}")
        if instrument not in self._supervisor.instruments:
            self._supervisor.instruments.append(instrument)

    def remove_instrument(self, instrument: Instrument) -> None:
        """Stop observing with `instrument` (from each module's next callback).

        Raises:
            KeyError: it was not added.
        """
        try:
            self._supervisor.instruments.remove(instrument)
        except ValueError:
            raise KeyError(f"instrument {instrument!r} was not added to this ledger") from None

    # -- dynamic control -------------------------------------------------------------------
    @overload
    async def add(self, module: ModuleSpec[M], /, **options: Any) -> ModuleHandle[M]: ...

    @overload
    async def add(self, module: M | Callable[[], M], /, **options: Any) -> ModuleHandle[M]: ...

    async def add(self, module: Any, /, **options: Any) -> ModuleHandle[Any]:
        """Register, init and start a module while RUNNING; it is last in start order.

        Cancellation: the module is cancelled and forgotten, as if `add` failed.

        Raises:
            RegistryError: already present, bad id, unknown dependency, not a Module.
            ModuleError: its init or start failed (it is not kept).
            LifecycleError: the ledger is not RUNNING.
        """
        self._require("add a module", Phase.RUNNING)
        child = self._supervisor.make_child(module, options)
        await self._supervisor.add(child)
        return _handle(child)

    async def terminate(self, module_id: str) -> None:
        """Stop a module (drain, `stop`, within `shutdown`), keeping its spec.

        A terminated module that overrides before_append holds appends closed (they fail with
        `ModuleError`) until `restart(id)` or `remove(id)`. No-op if already stopped.
        Cancellation: waits for the supervisor lock first; once stopping, bounded by `shutdown`.

        Raises:
            RegistryError: not found. LifecycleError: the ledger is not RUNNING.
        """
        await self._supervisor.terminate(module_id)

    async def restart(self, module_id: str) -> None:
        """Start a STOPPED or FAILED module again (a fresh instance if it has a factory).

        Raises:
            RegistryError: not found, or it is running. ModuleError: init/start failed.
            LifecycleError: the ledger is not RUNNING.
        """
        await self._supervisor.restart(module_id)

    async def remove(self, module_id: str) -> None:
        """Forget a STOPPED or FAILED module (appends no longer wait for it).

        Raises:
            RegistryError: not found, or still running. LifecycleError: not RUNNING.
        """
        await self._supervisor.remove(module_id)

    # -- appends ---------------------------------------------------------------------------
    def _commit_suffix(self) -> int:
        """Bytes a record's body gains at commit, estimated now (see `_checked_record`)."""
        # The committed bytes are the record's body plus `,"seq":N,"ts":T}`: estimate that
        # suffix once per call with the current length and last timestamp.
        return len(committed_bytes(b"", self._chain.length, self._chain.last_ts))

    def _check_records(self, records: Iterable[object], where: str) -> list[Record]:
        """Type and size checks before the hooks (the exact size is checked again at commit)."""
        limit = self.config.max_record_bytes
        suffix = self._commit_suffix()
        takes = f"{where} takes a Record"
        checked = []
        for item in records:
            record = _checked_record(item, suffix, limit, takes)
            if isinstance(record, InvalidRecord):
                raise record
            checked.append(record)
        return checked

    async def append(self, record: Record, *, idempotency_key: str | None = None) -> Receipt:
        """Append one record; return its receipt once it is stored and delivered.

        The record is checked (size), passed through every module's before_append in start
        order, chained, stored, and its after_append delivery queued in every running module's
        inbox before this returns (so an `ask` sent afterwards sees it).

        Cancellation: before the entry reaches storage the append is withdrawn (nothing is
        stored); once handed to storage it may still commit although you see `Cancelled`, and
        is then delivered normally.

        Raises:
            InvalidRecord: not a Record, or over `max_record_bytes` (before or after hooks).
            RecordRejected: a module vetoed it (`module_id`, `reason`).
            ModuleError: a module crashed or timed out in before_append, or a module with a
                before_append is FAILED/terminated (fail-closed).
            StorageError: storage failed; nothing was stored. Also: `idempotency_key` with a
                backend that does not keep keys (`IdempotencyStore`).
            LifecycleError: the ledger is not RUNNING.
            IdempotencyConflict: `idempotency_key` is in flight, or was used for a different
                record within `idempotency_window`.

        With `idempotency_key` (1..255 printable ASCII characters), the key is stored in the
        same storage batch as the entry; a later call with the same key and the same record,
        within `LedgerConfig.idempotency_window`, returns the first receipt and appends
        nothing (`append_keyed` also says whether it was a replay).
        """
        self._require("append", Phase.RUNNING)
        records = self._check_records([record], "append")
        if idempotency_key is not None:
            receipts, _ = await self.append_keyed(records, idempotency_key)
            return receipts[0]
        request = Request(records)
        self._pipeline.submit(request)
        receipts = await request.wait()
        return receipts[0]

    async def append_many(
        self, records: Iterable[Record], *, idempotency_key: str | None = None
    ) -> list[Receipt]:
        """Append records all-or-nothing: every record is stored, contiguous, or none is.

        One rejected or failed record fails the whole batch (a `RecordRejected` carries the
        `index` of the refused record). Cancellation, errors and `idempotency_key` as for
        `append`.
        """
        self._require("append", Phase.RUNNING)
        batch = self._check_records(records, "append_many")
        if idempotency_key is not None:
            receipts, _ = await self.append_keyed(batch, idempotency_key)
            return receipts
        if not batch:
            await trio.lowlevel.checkpoint()
            return []
        request = Request(batch)
        self._pipeline.submit(request)
        return await request.wait()

    async def append_each(self, records: Iterable[Record]) -> list[Receipt | NucleusError]:
        """Append records individually, in order: one outcome per record.

        Unlike `append_many`, a refused record fails alone: each outcome is the record's
        `Receipt`, or the error `append` would have raised for it (`RecordRejected`,
        `InvalidRecord`, `ModuleError`, `StorageError`, `LifecycleError`). The records travel
        the pipeline together (group commit), so this costs about what `append_many` costs.
        Records that succeed get increasing seqs in the order given (not necessarily
        contiguous: other appends may interleave).

        Cancellation: records not yet handed to storage are withdrawn (never stored); those
        already in storage may still commit although you see `Cancelled`, and are then
        delivered normally.

        Raises:
            LifecycleError: the ledger is not RUNNING (nothing was appended).
        """
        self._require("append", Phase.RUNNING)
        limit = self.config.max_record_bytes
        suffix = self._commit_suffix()
        slots: list[Request | NucleusError] = []
        given: Iterable[object] = records  # callers may pass anything: check each item
        for item in given:
            record = _checked_record(item, suffix, limit, "append_each takes Records")
            if isinstance(record, InvalidRecord):
                slots.append(record)
                continue
            request = Request([record])
            self._pipeline.submit(request)
            slots.append(request)
        await _wait_requests(slots)
        outcomes: list[Receipt | NucleusError] = []
        for slot in slots:
            if not isinstance(slot, Request):
                outcomes.append(slot)
            elif slot.error is None and slot.receipts is not None:
                outcomes.append(slot.receipts[0])
            elif isinstance(slot.error, NucleusError):
                outcomes.append(slot.error)
            elif slot.error is not None:
                raise slot.error
            else:  # pragma: no cover - defensive: answered without an outcome
                outcomes.append(LifecycleError("append was withdrawn"))
        return outcomes

    async def append_each_keyed(
        self, records: Sequence[Record], keys: Sequence[str | None]
    ) -> list[tuple[Receipt, bool] | NucleusError]:
        """`append_each` where each record may carry its own idempotency key (`None`: none).

        One outcome per record, in order: `(receipt, replayed)`, or the error for that record
        alone. A keyed record follows `append_keyed`'s rules for a batch of one: a key already
        committed for the same record (within `idempotency_window`) gives the first receipt
        with `replayed=True` and appends nothing; a key used for a different record, or in
        flight (another append with it has not finished, a second use in `keys` included), is
        an `IdempotencyConflict` for that record. The keys are looked up first (one storage
        read each), then every record to append is handed to the pipeline together, in order
        (group commit); each key is committed in the same storage batch as its entry.

        Cancellation: as for `append_each`; keys of records already handed to storage stay
        reserved until storage answered (shielded), so a retry never appends twice.

        Raises:
            ValueError: `keys` is not as long as `records`, or a key is not 1..255 printable
                ASCII characters (nothing was appended).
            StorageError: a key is given and the backend keeps no keys (`IdempotencyStore`).
            LifecycleError: the ledger is not RUNNING (nothing was appended).
        """
        self._require("append", Phase.RUNNING)
        records = list(records)
        keys = list(keys)
        if len(keys) != len(records):
            raise ValueError(
                f"append_each_keyed needs one key (or None) per record: {len(records)} records, "
                f"{len(keys)} keys"
            )
        for key in keys:
            if key is not None and not (
                isinstance(key, str) and 0 < len(key) <= 255 and all(" " < c <= "~" for c in key)
            ):
                raise ValueError(
                    f"an idempotency key must be 1..255 printable ASCII characters, got {key!r}"
                )
        store = (
            self.require_storage(IdempotencyStore, "idempotent appends")
            if any(key is not None for key in keys)
            else None
        )
        limit = self.config.max_record_bytes
        suffix = self._commit_suffix()
        # Per record: an outcome already known, or (key, fingerprint) still to look up, or
        # None (no key): then a Request once submitted.
        slots: list[Request | NucleusError | tuple[Receipt, bool] | None] = []
        pending: dict[int, tuple[str, str]] = {}
        reserved: list[str] = []
        given: list[object] = list(records)  # callers may pass anything: check each item
        for index, (item, key) in enumerate(zip(given, keys, strict=True)):
            record = _checked_record(item, suffix, limit, "append_each_keyed takes Records")
            if isinstance(record, InvalidRecord):
                slots.append(record)
                continue
            if key is not None:
                if key in self._keys_in_flight:
                    slots.append(
                        IdempotencyConflict(
                            f"idempotency key {key!r} is in flight: an append with it has not "
                            "finished; retry once it has",
                            key=key,
                            in_flight=True,
                        )
                    )
                    continue
                self._keys_in_flight.add(key)  # reserved with no checkpoint since the check
                reserved.append(key)
                pending[index] = (key, _fingerprint([record]))
            slots.append(None)
        try:
            if store is not None and pending:
                horizon = self.config.wall_clock() - int(self.config.idempotency_window * 1e6)
                pruned = False
                for index, (key, fingerprint) in pending.items():
                    found = await store.get_idempotency(key)
                    if found is not None and found.created < horizon:
                        if not pruned:
                            await store.prune_idempotency(horizon)
                            pruned = True
                        found = None
                    if found is None:
                        continue
                    if found.fingerprint != fingerprint:
                        slots[index] = IdempotencyConflict(
                            f"idempotency key {key!r} was used for a different request (seqs "
                            f"{found.first_seq}..{found.first_seq + found.count - 1}); send a "
                            "new request with a new key",
                            key=key,
                            in_flight=False,
                        )
                    else:
                        entry = await self.get(found.first_seq)
                        slots[index] = (entry.receipt(), True)
            self._require("append", Phase.RUNNING)
            for index, slot in enumerate(slots):  # no checkpoint: they travel together
                if slot is None:
                    request = Request([records[index]], pending.get(index))
                    self._pipeline.submit(request)
                    slots[index] = request
            await _wait_requests(slots)
        finally:
            storing = [s for s in slots if isinstance(s, Request) and s.storing and not s.done]
            if storing:
                with trio.CancelScope(shield=True):
                    for request in storing:
                        await request._wait()
            self._keys_in_flight.difference_update(reserved)
        outcomes: list[tuple[Receipt, bool] | NucleusError] = []
        for slot in slots:
            if isinstance(slot, Request):
                if slot.error is None and slot.receipts is not None:
                    outcomes.append((slot.receipts[0], False))
                elif isinstance(slot.error, NucleusError):
                    outcomes.append(slot.error)
                elif slot.error is not None:
                    raise slot.error
                else:  # pragma: no cover - defensive: answered without an outcome
                    outcomes.append(LifecycleError("append was withdrawn"))
            else:
                assert slot is not None
                outcomes.append(slot)
        return outcomes

    async def append_keyed(self, records: Sequence[Record], key: str) -> tuple[list[Receipt], bool]:
        """Append `records` all-or-nothing under the idempotency key `key`; return the receipts
        and whether they are a replay (the key was already committed for the same records:
        nothing was appended).

        The key is checked and reserved atomically (no checkpoint between), so two appends
        with one key never both run: the second gets `IdempotencyConflict(in_flight=True)`.
        The key is committed in the same storage batch as the entries, so it survives a
        restart exactly when they do. Keys older than `idempotency_window` are forgotten.

        Cancellation: as for `append`; a cancelled append that already reached storage keeps
        its key reserved until storage answered (shielded), so a retry never appends twice.

        Raises:
            IdempotencyConflict: the key is in flight, or was used for different records.
            ValueError: the key is empty, longer than 255 characters or not printable ASCII.
            StorageError: the backend does not keep idempotency keys; or as for `append`.
        """
        self._require("append", Phase.RUNNING)
        if not (isinstance(key, str) and 0 < len(key) <= 255 and all(" " < c <= "~" for c in key)):
            raise ValueError(
                f"an idempotency key must be 1..255 printable ASCII characters, got {key!r}"
            )
        store = self.require_storage(IdempotencyStore, "idempotent appends")
        batch = self._check_records(records, "append_keyed")
        if key in self._keys_in_flight:
            raise IdempotencyConflict(
                f"idempotency key {key!r} is in flight: an append with it has not finished; "
                "retry once it has",
                key=key,
                in_flight=True,
            )
        self._keys_in_flight.add(key)
        request: Request | None = None
        try:
            fingerprint = _fingerprint(batch)
            found = await store.get_idempotency(key)
            if found is not None:
                horizon = self.config.wall_clock() - int(self.config.idempotency_window * 1e6)
                if found.created < horizon:
                    await store.prune_idempotency(horizon)
                    found = None
            if found is not None:
                if found.fingerprint != fingerprint:
                    raise IdempotencyConflict(
                        f"idempotency key {key!r} was used for a different request (seqs "
                        f"{found.first_seq}..{found.first_seq + found.count - 1}); send a new "
                        "request with a new key",
                        key=key,
                        in_flight=False,
                    )
                entries = [
                    e async for e in self.read(found.first_seq, found.first_seq + found.count)
                ]
                return [entry.receipt() for entry in entries], True
            request = Request(batch, (key, fingerprint))
            self._pipeline.submit(request)
            return await request.wait(), False
        finally:
            if request is not None and request.storing and not request.done:
                with trio.CancelScope(shield=True):
                    await request._wait()
            self._keys_in_flight.discard(key)

    def fence(self, error: Fenced) -> None:
        """Stop writing for good: another writer holds the ledger (`error` says which epoch).

        What happens when storage refuses a batch with `Fenced`, for a caller that learned it
        otherwise (e.g. `PostgresStorage.wait_lost`): queued appends fail with `Fenced`, the
        modules stop and the `async with` block ends with `LedgerFailed` caused by `error`.
        Idempotent. Raises nothing.
        """
        if self._open:
            self._pipeline.fenced(error)

    async def refresh(self) -> int:
        """Adopt the entries another writer stored beyond this ledger's head; the new length.

        For a read-only follower (a standby on shared storage, whose storage's `head()` reads
        the database): the new entries are checked against the chain, the tree is reloaded,
        `wait_length` waiters wake and running modules get them. Does nothing while this
        engine's own appends are in flight.

        Cancellation: the head and entries are re-read on the next call; nothing half-done.

        Raises:
            LifecycleError: the engine is not open. IntegrityError: storage holds a chain that
                does not continue this one. StorageError: storage failed.
        """
        if not self._open:
            raise self._not_open("refresh")
        pipeline = self._pipeline
        if pipeline.storing or self._keys_in_flight:
            await trio.lowlevel.checkpoint()
            return self._chain.length
        async with pipeline._store_lock:
            await pipeline._resync_head()
        return self._chain.length

    # -- reads -----------------------------------------------------------------------------
    async def get(self, seq: int) -> Entry:
        """The stored entry at `seq`.

        Raises:
            IndexError: no entry at `seq`. IntegrityError: it cannot be decoded.
            LifecycleError: the engine is not open.
        """
        if not self._open:
            raise self._not_open("get")
        length = self._chain.length
        if type(seq) is not int or not 0 <= seq < length:
            raise IndexError(
                f"seq {seq!r} is not in ledger {self.config.ledger_id!r} (length {length})"
            )
        entry = await _first(self.storage.read(seq, seq + 1))
        if entry is not None:
            return entry
        raise IndexError(f"seq {seq} is not in ledger {self.config.ledger_id!r}")

    def read(self, start: int = 0, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries with `start <= seq < stop` in order (`stop=None`: to the head now).

        Raises:
            ValueError: bad range. IntegrityError: an entry cannot be decoded.
            LifecycleError: the engine is not open (raised at once).
        """
        if not self._open:
            raise self._not_open("read")
        return self.storage.read(start, stop)

    async def verify(self) -> Hash:
        """Recompute the whole chain from storage; return the verified head.

        Streams entries (bounded memory). Cancellation: nothing to undo.

        Raises:
            IntegrityError: naming the seq of the first entry that does not verify.
        """
        if not self._open:
            raise self._not_open("verify")
        expected = self._chain.length
        verifier = ChainVerifier(genesis(self.config.ledger_id))
        entries = self.storage.read(0, expected)
        try:
            async for entry in entries:
                verifier.feed(entry)
        finally:
            await _close(entries)
        if verifier.length != expected:
            raise IntegrityError(
                f"storage holds {verifier.length} entries, the ledger committed {expected}",
                seq=verifier.length,
            )
        if expected and verifier.length == self._chain.length and verifier.head != self._chain.head:
            raise IntegrityError(
                f"entry {expected - 1}: stored chain head differs from the committed head",
                seq=expected - 1,
            )
        return verifier.head

    # -- Merkle tree and proofs ------------------------------------------------------------
    async def _open_tree(self) -> LedgerTree | None:
        """The ledger's tree, loaded (or built once, for storage written without it)."""
        wanted = self.config.merkle_tree
        if wanted is False:
            return None
        if wanted is None and not isinstance(self.storage, TreeStore):
            return None
        store = self.require_storage(TreeStore, "keep the Merkle tree (merkle_tree=True)")
        tree = LedgerTree(store, self.config.ledger_id)
        await tree.open(self.storage, self._chain.length)
        return tree

    def _proof_tree(self, what: str) -> LedgerTree:
        if not self._open:
            raise self._not_open(what)
        if self._tree is None:
            why = (
                "LedgerConfig.merkle_tree=False"
                if self.config.merkle_tree is False
                else f"storage backend {type(self.storage).__name__} lacks TreeStore"
            )
            raise StorageError(
                f"cannot {what}: ledger {self.config.ledger_id!r} keeps no Merkle tree ({why})"
            )
        return self._tree

    async def root(self, size: int | None = None) -> Hash:
        """Merkle root (docs/hashing.md) of the first `size` entries (`None`: every committed
        entry; `blake3()` of nothing for 0).

        `root()` is computed from memory; a past size reads O(log n) tree tiles from storage.
        Cancellation: nothing to undo.

        Raises:
            ProofError: `size` is not an int in `[0, length]`. StorageError: the ledger keeps
                no tree, or storage failed. LifecycleError: the engine is not open.
        """
        return await self._proof_tree("compute a Merkle root").root(size, self._chain.length)

    async def inclusion_proof(self, seq: int, size: int | None = None) -> InclusionProof:
        """Proof that entry `seq` is in the tree of the first `size` entries (`None`: all).

        One storage read of O(log n) tree tiles; the proof holds at most `ceil(log2 size)`
        hashes. Cancellation: nothing to undo.

        Raises:
            ProofError: `seq` not in `[0, size)` or `size` not in `[1, length]`.
            StorageError: the ledger keeps no tree, or storage failed.
            LifecycleError: the engine is not open.
        """
        return await self._proof_tree("prove inclusion").inclusion(seq, size, self._chain.length)

    async def consistency_proof(
        self, old_size: int, new_size: int | None = None
    ) -> ConsistencyProof:
        """Proof that the tree of `old_size` entries is a prefix of the `new_size` one (`None`:
        every committed entry).

        One storage read of O(log n) tree tiles; at most `ceil(log2 new_size) + 1` hashes.
        Cancellation: nothing to undo.

        Raises:
            ProofError: `old_size` not in `[1, new_size]` or `new_size` not in `[1, length]`.
            StorageError: the ledger keeps no tree, or storage failed.
            LifecycleError: the engine is not open.
        """
        tree = self._proof_tree("prove consistency")
        return await tree.consistency(old_size, new_size, self._chain.length)


@asynccontextmanager
async def open_ledger(
    config: LedgerConfig,
    *,
    storage: StorageBackend | None = None,
    modules: Sequence[Module | Callable[[], Module] | ModuleSpec[Any]] = (),
) -> AsyncIterator[LedgerEngine]:
    """Open a ledger, register `modules`, `init_all`, `start_all`, and yield the engine.

    Leaving the block stops it as `LedgerEngine.__aexit__` describes. It needs trio: from
    asyncio it raises `EventLoopError` (use `nucleus_actors.aio.open_ledger` there).
    """
    engine = LedgerEngine(config, storage)
    for module in modules:
        engine.register(module)
    async with engine:
        await engine.init_all()
        await engine.start_all()
        yield engine


def _fingerprint(records: Sequence[Record]) -> str:
    """What an idempotency key is bound to: a digest of the records' canonical content."""
    digest = hashlib.sha256()
    for record in records:
        body = record._body
        digest.update(b"%d:" % len(body))
        digest.update(body)
    return digest.hexdigest()
