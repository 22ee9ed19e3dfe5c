"""A ledger embedded in an asyncio application (FastAPI, aiohttp, a plain `asyncio.run`).

```python
from nucleus_actors import LedgerConfig, Record, aio

async def main() -> None:
    async with aio.open_ledger(LedgerConfig(ledger_id="orders"), modules=[Audit()]) as ledger:
        receipt = await ledger.append(Record("order.created", {"id": 7}))
```

The runtime stays trio: `open_ledger` runs the `LedgerEngine`, its modules and their actors on a
trio loop in a dedicated thread (one per ledger), and the returned `Ledger` forwards each call
to it. Calls made concurrently by many asyncio tasks cross between the threads in batches (one
wake-up per batch in each direction, not one per call). Errors are the engine's own exception
objects, raised unchanged. docs/asyncio.md explains the design and why it is a thread rather
than trio's guest mode.

Cancellation is faithful both ways: cancelling an asyncio task that awaits a call cancels that
call on the trio side (and the task sees `CancelledError` when the trio call has returned);
leaving the `async with` block stops the ledger as leaving the trio `open_ledger` does; a
ledger that fails on the trio side cancels the block and `LedgerFailed` comes out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    Generic,
    Literal,
    TypeVar,
    TypeVarTuple,
    Unpack,
    overload,
)

import trio

from ._future import Future
from ._groups import leaves
from ._pipeline import Request
from .config import LedgerConfig
from .engine import LedgerEngine
from .errors import EventLoopError, LifecycleError
from .lifecycle import LedgerState, ModuleState, Phase
from .module._base import Module
from .module._spec import ModuleSpec
from .record import Entry, Hash, Receipt, Record
from .registry import ModuleCounts, ModuleStatus, Statistics
from .registry import ModuleHandle as _TrioHandle
from .storage import StorageBackend

__all__ = ["Ledger", "ModuleHandle", "Modules", "open_ledger", "run_in_host"]

T = TypeVar("T")
M = TypeVar("M", bound=Module)
Ts = TypeVarTuple("Ts")

_READ_CHUNK: Final = 256  # entries fetched per crossing by `Ledger.read`
_IDLE_WORKERS: Final = 64  # parked trio worker tasks kept for the next burst of calls

# The host loop of the ledger whose trio run this is (for `run_in_host`).
_HOST_LOOP: trio.lowlevel.RunVar[asyncio.AbstractEventLoop] = trio.lowlevel.RunVar("host_loop")


class _HostRaised(Exception):
    """Raised inside the trio block when the asyncio block raised: the ledger stops as after an
    error (full `stop_all`), then the host's own exception propagates."""


class _NotRun(Exception):
    """Outcome of a call the trio side never started: the ledger closed first."""


class _Call:
    """One call from the host into the trio loop, and (once finished) its outcome."""

    __slots__ = (
        "args",
        "cancelled",
        "delivered",
        "error",
        "fn",
        "future",
        "request",
        "scope",
        "settled",
        "value",
    )

    def __init__(
        self, fn: Callable[..., Awaitable[Any]] | None, args: tuple[Any, ...], future: Any
    ) -> None:
        self.fn = fn  # None: an append (`args` = records, single), submitted to the pipeline
        self.args = args
        self.request: _AppendRequest | None = None
        self.future: asyncio.Future[None] = future
        self.scope: trio.CancelScope | None = None
        self.cancelled = False  # the host asked to cancel it
        self.delivered = False  # trio side: the outcome was handed to the host
        self.settled = False  # host side: the outcome was received
        self.value: Any = None
        self.error: BaseException | None = None


class _AppendRequest(Request):
    """An append submitted by the bridge: no trio task waits for it; resolving it hands the
    outcome straight to the host (the fast path: no task per call on the trio side)."""

    __slots__ = ("bridge", "call", "single")

    def __init__(self, records: list[Record], bridge: _Bridge, call: _Call, single: bool):
        super().__init__(records)
        self.bridge = bridge
        self.call = call
        self.single = single

    def _resolve(self) -> None:
        self._done = True
        call = self.call
        if call.delivered:
            return  # cancelled by the host meanwhile: already answered
        if self.error is not None:
            call.error = self.error
        elif self.receipts is None:  # pragma: no cover - defensive, as in Request.wait
            call.error = LifecycleError("append was withdrawn")
        else:
            call.value = self.receipts[0] if self.single else self.receipts
        self.bridge._deliver(call)


_CALL: Final = 0
_CANCEL: Final = 1
_EXIT: Final = 2

_Exit = Literal["normal", "raised", "cancelled"]


class _Bridge:
    """Both ends of one ledger's bridge: the host (asyncio) side and the trio side.

    Host -> trio: operations go into `_inbox`; the first one sent in a pass of the host loop
    schedules, at the end of that pass, one `_drain_inbox` on the trio loop
    (`TrioToken.run_sync_soon`). Trio -> host: finished calls go into `_outbox`; the first one
    wakes `_flusher`, which posts one `_drain_outbox` to the host loop
    (`call_soon_threadsafe`) after the trio tasks runnable with it have run. So N concurrent
    callers cost two wake-ups, not 2N.
    """

    def __init__(
        self,
        engine: LedgerEngine,
        loop: asyncio.AbstractEventLoop,
        *,
        guest: bool,
        clock: trio.abc.Clock | None,
    ) -> None:
        self.engine = engine
        self.loop = loop
        self.guest = guest  # trio guest mode on the host loop (benchmarks only)
        self.clock = clock  # tests: a MockClock for the trio loop
        self.calls = 0  # calls sent (statistics for tests and benchmarks)
        self.crossings = 0  # host -> trio wake-ups (one per batch of operations)
        self.returns = 0  # trio -> host wake-ups (one per batch of outcomes)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[int, Any]] = deque()
        self._inbox_scheduled = False
        self._outbox: deque[_Call] = deque()
        self._outbox_scheduled = False
        self._closed = False  # the trio side takes no more operations
        self._token: trio.lowlevel.TrioToken | None = None
        # trio side
        self._pending: deque[_Call] = deque()
        self._idle: list[Future] = []
        self._workers: trio.Nursery | None = None
        self._body: trio.CancelScope | None = None
        self._exit = trio.Event()
        self._flush: Future | None = None  # resolved to make `_flusher` post the outbox
        self._exit_reason: _Exit = "normal"
        # host side
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None  # how the trio side ended
        self.on_finished: Callable[[], None] = lambda: None
        self.in_flight: set[_Call] = set()  # sent, not answered yet (host loop)

    # -- host side ---------------------------------------------------------------------------
    def send(self, kind: int, item: Any) -> bool:
        """Queue an operation for the trio side (host loop); False if it has closed.

        The trio side is woken once per pass of the host loop, after every task that runs in
        that pass has queued its calls (a `call_soon`, not a wake-up per call: each wake-up
        is a syscall that also hands the GIL to the trio thread).
        """
        with self._lock:
            if self._closed:
                return False
            self._inbox.append((kind, item))
            self.calls += kind == _CALL
            if self._inbox_scheduled:
                return True
            self._inbox_scheduled = True
        self.loop.call_soon(self._wake_trio)
        return True

    def _wake_trio(self) -> None:
        with self._lock:
            token = self._token
        if token is None:
            return  # not started yet: `run` drains the inbox when it starts
        # RunFinishedError: closed meanwhile, and `_close` answered what was queued.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._drain_inbox)

    def _drain_outbox(self) -> None:
        with self._lock:
            calls = list(self._outbox)
            self._outbox.clear()
            self._outbox_scheduled = False
            self.returns += bool(calls)
        for call in calls:
            self.resolve(call)

    def resolve(self, call: _Call) -> None:
        """Host loop: hand a finished call's outcome to the task awaiting it."""
        call.settled = True
        self.in_flight.discard(call)
        future = call.future
        if not future.done():
            future.set_result(None)

    def _finished(self, error: BaseException | None) -> None:
        """The trio run has ended (host loop)."""
        self._drain_outbox()
        for call in list(self.in_flight):  # never answered (the trio run crashed): closed
            call.error = _NotRun()
            self.resolve(call)
        self.error = error
        if not self.done.done():
            self.done.set_result(None)
        if not self.ready.done():
            self.ready.set_result(None)
        self.on_finished()

    def post(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn(*args)` on the host loop soon (from the trio side)."""
        if self.guest:
            self.loop.call_soon(fn, *args)
            return
        with contextlib.suppress(RuntimeError):  # the host loop closed under a running ledger
            self.loop.call_soon_threadsafe(fn, *args)

    # -- trio side ---------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        with self._lock:
            ops = list(self._inbox)
            self._inbox.clear()
            self._inbox_scheduled = False
            self.crossings += 1
        for kind, item in ops:
            if kind == _CALL and item.fn is None:
                self._submit_append(item)
            elif kind == _CALL:
                self._pending.append(item)
                if self._idle:
                    self._idle.pop()._resolve()
                else:
                    assert self._workers is not None
                    self._workers.start_soon(self._worker)
            elif kind == _CANCEL:
                call: _Call = item
                call.cancelled = True
                if call.scope is not None:
                    call.scope.cancel()
                request = call.request
                if request is not None and not call.delivered:
                    # What `Request.wait` does when its caller is cancelled: withdrawn unless
                    # already handed to storage (then it may still commit).
                    if not request.storing:
                        request.withdrawn = True
                    call.error = _NotRun()
                    self._deliver(call)
            else:
                self._exit_reason = item
                if item == "cancelled" and self._body is not None:
                    self._body.cancel()
                self._exit.set()

    def _submit_append(self, call: _Call) -> None:
        """`LedgerEngine.append`/`append_many` up to `request.wait()`, the same checks in the
        same order (keep in step with engine.py), with the bridge as the waiter."""
        engine = self.engine
        records, single = call.args
        try:
            engine._require("append", Phase.RUNNING)
            batch = engine._check_records(records, "append" if single else "append_many")
        except Exception as exc:
            call.error = exc
            self._deliver(call)
            return
        if not batch:
            call.value = []
            self._deliver(call)
            return
        call.request = _AppendRequest(batch, self, call, single)
        engine._pipeline.submit(call.request)

    async def _worker(self) -> None:
        """Run calls one after another; park while there is none (a pool, not a task per
        call: spawning costs more than waking a parked task)."""
        while True:
            while not self._pending:
                if len(self._idle) >= _IDLE_WORKERS:
                    return
                waiter = Future()
                self._idle.append(waiter)
                try:
                    await waiter._wait()
                except BaseException:
                    if waiter in self._idle:
                        self._idle.remove(waiter)
                    raise
            call = self._pending.popleft()
            assert call.fn is not None  # appends never queue here
            if call.cancelled:  # cancelled by the host before it started: it never runs
                call.error = _NotRun()
                self._deliver(call)
                continue
            with trio.CancelScope() as scope:
                call.scope = scope
                try:
                    call.value = await call.fn(*call.args)
                except BaseException as exc:  # delivered to the host, raised there
                    call.error = exc
            call.scope = None
            self._deliver(call)

    def _deliver(self, call: _Call) -> None:
        if call.delivered:
            return
        call.delivered = True
        if self.guest:
            self.resolve(call)
            return
        with self._lock:
            self._outbox.append(call)
            if self._outbox_scheduled:
                return
            self._outbox_scheduled = True
        if self._flush is not None:
            self._flush._resolve()
        else:
            self.post(self._drain_outbox)

    async def _flusher(self) -> None:
        """Post the outbox to the host once per trio scheduling batch: the calls that finish
        together (a pipeline batch answers many appends at once) cross back together."""
        try:
            while True:
                self._flush = Future()
                await self._flush._wait()
                self.post(self._drain_outbox)
        finally:
            self._flush = None  # later outcomes are posted one batch at a time by `_deliver`

    def _close(self) -> None:
        """The trio side ends: refuse new operations, answer the ones not started."""
        with self._lock:
            self._closed = True
            ops = list(self._inbox)
            self._inbox.clear()
        left = [*self._pending, *(item for kind, item in ops if kind == _CALL)]
        self._pending.clear()
        for call in left:
            call.error = _NotRun()
            self._deliver(call)

    async def run(self, on_ready: Callable[[], None]) -> None:
        """The trio run: open the engine, serve calls until the host leaves the block."""
        with self._lock:
            self._token = trio.lowlevel.current_trio_token()
            if self._inbox:  # sent before the run started (an early exit)
                self._inbox_scheduled = True
                self._token.run_sync_soon(self._drain_inbox)
        _HOST_LOOP.set(self.loop)
        engine = self.engine
        try:
            async with trio.open_nursery() as workers:
                self._workers = workers
                if not self.guest:
                    workers.start_soon(self._flusher)
                try:
                    with trio.CancelScope() as body:
                        self._body = body
                        if self._exit_reason == "cancelled":
                            body.cancel()
                        async with engine:
                            await engine.init_all()
                            await engine.start_all()
                            self.post(on_ready)
                            await self._exit.wait()
                            if self._exit_reason == "raised":
                                raise _HostRaised
                finally:
                    self._close()
                    workers.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            found = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
            if len(found) != 1:
                raise
            raise found[0] from found[0].__cause__

    def start(self, on_ready: Callable[[], None], name: str) -> threading.Thread | None:
        """Start the trio run (a thread, or guest mode on the host loop)."""
        if self.guest:

            def guest_done(result: Any) -> None:
                self._finished(getattr(result, "error", None))

            self._token = None
            trio.lowlevel.start_guest_run(
                self.run,
                on_ready,
                run_sync_soon_threadsafe=self.loop.call_soon_threadsafe,
                run_sync_soon_not_threadsafe=self.loop.call_soon,
                done_callback=guest_done,
                host_uses_signal_set_wakeup_fd=True,
                clock=self.clock,
            )
            return None

        def main() -> None:
            error: BaseException | None = None
            try:
                trio.run(self.run, on_ready, clock=self.clock)
            except BaseException as exc:  # handed to the host loop, raised there
                error = exc
            self.post(self._finished, error)

        thread = threading.Thread(target=main, name=name, daemon=True)
        thread.start()
        return thread


class Ledger:
    """A running ledger seen from asyncio: the `LedgerEngine` API, every call awaitable.

    Returned by `open_ledger`; usable from the event loop that opened it (any task on it).
    Each method runs the engine's method of the same name on the ledger's trio loop and raises
    the engine's own errors. Reads of live state (`state()`, `statistics()`,
    `modules.status()`) are coroutines here, because the engine lives on another thread: a
    crossing gives a consistent snapshot.

    Cancellation, for every coroutine: cancelling the awaiting task cancels the call on the
    trio side, with the effect the engine method documents for cancellation; `CancelledError`
    is raised once the trio side has taken the cancellation into account, when the trio call
    would have returned (so an append not yet handed to storage is withdrawn by then).
    """

    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge
        self._engine = bridge.engine
        self._loop = bridge.loop
        self._open = False
        self._modules = Modules(self)

    @property
    def config(self) -> LedgerConfig:
        """The ledger's configuration."""
        return self._engine.config

    @property
    def modules(self) -> Modules:
        """The ledger's modules: `await status()`, `await counts()`, `await get(id or class)`."""
        return self._modules

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<aio.Ledger {self.config.ledger_id!r} {state}>"

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]] | None, *args: Any) -> T:
        """Run `await fn(*args)` on the trio loop; return its result or raise its error.

        `fn=None` is an append (`args`: records, single) that goes straight to the pipeline.
        """
        if asyncio.get_running_loop() is not self._loop:
            raise EventLoopError(
                f"cannot {what}: ledger {self.config.ledger_id!r} belongs to the event loop that "
                "opened it, and this call came from another loop"
            )
        bridge = self._bridge
        call = _Call(fn, args, self._loop.create_future())
        if not self._open or not bridge.send(_CALL, call):
            raise self._closed(what)
        bridge.in_flight.add(call)
        try:
            await call.future
        except asyncio.CancelledError:
            if call.settled:
                raise
            # The task was cancelled while the trio side works: cancel it there, and return
            # only once it has finished (an append is then withdrawn or committed).
            call.future = self._loop.create_future()
            if bridge.send(_CANCEL, call):
                await _wait_uncancellable(call.future)
            raise
        error = call.error
        if error is None:
            value: T = call.value
            return value
        call.error = None  # no reference cycle through the traceback
        if isinstance(error, trio.Cancelled | _NotRun):
            # Not cancelled by the host: the ledger closed while the call was in progress.
            raise self._closed(what) from None
        raise error

    def _closed(self, what: str) -> LifecycleError:
        engine = self._engine
        return LifecycleError(
            f"cannot {what}: ledger {self.config.ledger_id!r} is closed ({engine.phase.name}); "
            "calls are accepted inside `async with aio.open_ledger(...)`",
            phase=engine.phase,
        )

    # -- state -------------------------------------------------------------------------------
    async def state(self) -> LedgerState:
        """Snapshot: phase, length, head hash (`LedgerEngine.state`)."""
        return await self._call("read the state", _state, self._engine)

    async def statistics(self) -> Statistics:
        """Counters: committed appends, rejects, crashes, restarts."""
        return await self._call("read statistics", _sync, self._engine.statistics)

    async def wait_length(self, length: int) -> int:
        """Wait until the ledger holds at least `length` entries (`LedgerEngine.wait_length`).

        Cancellation: just stops waiting.
        """
        return await self._call("wait_length", self._engine.wait_length, length)

    async def wait_phase(self, phase: Phase, *more: Phase) -> Phase:
        """Wait until the ledger is in one of the given phases. Cancellation: stops waiting."""
        return await self._call("wait_phase", self._engine.wait_phase, phase, *more)

    # -- appends -----------------------------------------------------------------------------
    async def append(self, record: Record) -> Receipt:
        """Append one record; return its receipt once stored and delivered.

        As `LedgerEngine.append`, errors included. Cancellation: withdrawn if it had not
        reached storage (withdrawn by the time `CancelledError` is raised); once handed to
        storage it may still commit although the task sees `CancelledError`, as in trio.
        """
        receipt: Receipt = await self._call("append", None, [record], True)
        return receipt

    async def append_many(self, records: Iterable[Record]) -> list[Receipt]:
        """Append records all-or-nothing (`LedgerEngine.append_many`). Cancellation as `append`."""
        receipts: list[Receipt] = await self._call("append", None, list(records), False)
        return receipts

    # -- reads -------------------------------------------------------------------------------
    async def get(self, seq: int) -> Entry:
        """The stored entry at `seq` (`LedgerEngine.get`). Cancellation: nothing to undo."""
        return await self._call("get", self._engine.get, seq)

    def read(self, start: int = 0, stop: int | None = None) -> AsyncIterator[Entry]:
        """Entries with `start <= seq < stop` in order (`stop=None`: to the head when the
        iteration starts), fetched from the trio side in chunks.

        Close it (`aclose()`, or `contextlib.aclosing`) when you stop early; a ledger that
        closes closes its open reads. Range errors are raised by the first `__anext__`.

        Raises:
            LifecycleError: the ledger is closed (raised at once).
        """
        if not self._open:
            raise self._closed("read")
        return _Reader(self, start, stop)

    async def verify(self) -> Hash:
        """Recompute the whole chain from storage (`LedgerEngine.verify`); return the head.

        Cancellation: nothing to undo.
        """
        return await self._call("verify", self._engine.verify)

    # -- dynamic control ---------------------------------------------------------------------
    @overload
    async def add(self, module: ModuleSpec[M], /, **options: Any) -> ModuleHandle[M]: ...

    @overload
    async def add(self, module: M | Callable[[], M], /, **options: Any) -> ModuleHandle[M]: ...

    async def add(self, module: Any, /, **options: Any) -> ModuleHandle[Any]:
        """Register, init and start a module while RUNNING (`LedgerEngine.add`).

        Cancellation: the module is cancelled and forgotten, as if `add` failed.
        """
        handle = await self._call("add a module", _add, self._engine, module, options)
        return ModuleHandle(self, handle)

    async def terminate(self, module_id: str) -> None:
        """Stop a module, keeping its spec (`LedgerEngine.terminate`)."""
        await self._call("terminate", self._engine.terminate, module_id)

    async def restart(self, module_id: str) -> None:
        """Start a STOPPED or FAILED module again (`LedgerEngine.restart`)."""
        await self._call("restart", self._engine.restart, module_id)

    async def remove(self, module_id: str) -> None:
        """Forget a STOPPED or FAILED module (`LedgerEngine.remove`)."""
        await self._call("remove", self._engine.remove, module_id)

    async def stop_all(self) -> None:
        """Stop the ledger now (`LedgerEngine.stop_all`); leaving the block does it anyway.

        Cancellation: the modules not stopped yet are cancelled at once (as in trio).
        """
        await self._call("stop_all", self._engine.stop_all)

    async def run_in_trio(self, fn: Callable[[LedgerEngine], Awaitable[T]]) -> T:
        """Run `await fn(engine)` on the ledger's trio loop; return its result.

        The escape hatch for what the bridge does not forward: `fn` is trio code and gets the
        `LedgerEngine` itself (use it only inside `fn`). Cancellation: `fn` is cancelled (a
        trio cancellation) and `CancelledError` is raised once it has returned.
        """
        return await self._call("run_in_trio", fn, self._engine)

    if not TYPE_CHECKING:  # at run time only: type checkers keep flagging unknown names

        def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
            """Any other public coroutine method of `LedgerEngine` (one added after this
            module was written), forwarded as the methods above are."""
            engine_type = type(self._engine)
            method = getattr(engine_type, name, None) if not name.startswith("_") else None
            if method is None or not inspect.iscoroutinefunction(method):
                raise AttributeError(
                    f"aio.Ledger has no attribute {name!r} (engine coroutines are forwarded; "
                    "for anything else use `await ledger.run_in_trio(fn)`)"
                )
            bound = getattr(self._engine, name)

            async def forward(*args: Any, **kwargs: Any) -> Any:
                return await self._call(name, functools.partial(bound, **kwargs), *args)

            forward.__name__ = name
            forward.__doc__ = method.__doc__
            return forward


async def _state(engine: LedgerEngine) -> LedgerState:
    return engine.state


async def _sync(fn: Callable[[], T]) -> T:
    return fn()


async def _add(engine: LedgerEngine, module: Any, options: dict[str, Any]) -> _TrioHandle[Any]:
    return await engine.add(module, **options)


async def _get_handle(engine: LedgerEngine, key: Any) -> _TrioHandle[Any]:
    return engine.modules.get(key)


async def _wait_uncancellable(future: asyncio.Future[Any]) -> bool:
    """Wait for `future` through further cancellations; True if the task was cancelled."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


class _Reader(AsyncIterator[Entry]):
    """`Ledger.read`: the trio-side iterator, fetched in chunks."""

    def __init__(self, ledger: Ledger, start: int, stop: int | None) -> None:
        self._ledger = ledger
        self._start = start
        self._stop = stop
        self._buffer: deque[Entry] = deque()
        self._source: AsyncIterator[Entry] | None = None
        self._finished = False
        self._error: BaseException | None = None

    async def __anext__(self) -> Entry:
        if not self._buffer and not self._finished:
            await self._ledger._call("read", self._fetch)
        if self._buffer:
            return self._buffer.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopAsyncIteration

    async def _fetch(self) -> None:
        """Trio side: pull up to a chunk of entries into the buffer."""
        if self._source is None:
            self._source = self._ledger._engine.read(self._start, self._stop)
        source = self._source
        try:
            while len(self._buffer) < _READ_CHUNK:
                self._buffer.append(await source.__anext__())
        except StopAsyncIteration:
            self._finished = True
        except BaseException as exc:
            self._finished = True
            if not self._buffer or isinstance(exc, trio.Cancelled):
                raise
            self._error = exc  # raised after the entries read before it
        if self._finished:
            await _aclose(source)

    async def aclose(self) -> None:
        """Close the trio-side iterator (no-op when finished). Cancellation: as `_call`."""
        self._buffer.clear()
        if self._source is not None and not self._finished:
            self._finished = True
            source = self._source
            if self._ledger._open:
                await self._ledger._call("close a read", _aclose, source)


async def _aclose(source: AsyncIterator[Entry]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        with trio.CancelScope(shield=True):
            await aclose()


class Modules:
    """`Ledger.modules`: the module registry seen from asyncio (snapshots are coroutines)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def status(self) -> list[ModuleStatus]:
        """Snapshots of every module, in start order."""
        registry = self._ledger._engine.modules
        return await self._ledger._call("read module status", _sync, registry.status)

    async def counts(self) -> ModuleCounts:
        """How many modules are running, restarting, stopped, failed."""
        registry = self._ledger._engine.modules
        return await self._ledger._call("read module counts", _sync, registry.counts)

    @overload
    async def get(self, key: type[M]) -> ModuleHandle[M]: ...

    @overload
    async def get(self, key: str) -> ModuleHandle[Module]: ...

    async def get(self, key: type[M] | str) -> ModuleHandle[Any]:
        """The handle of a module, by id or by class (`ModuleRegistry.get`).

        Raises:
            RegistryError: no such module, or several modules are instances of that class.
        """
        ledger = self._ledger
        handle = await ledger._call("get a module", _get_handle, ledger._engine, key)
        return ModuleHandle(ledger, handle)


class ModuleHandle(Generic[M]):
    """A handle on one module, seen from asyncio: `id`, and `status`/`state`/`ask` awaitable."""

    __slots__ = ("_handle", "_ledger")

    def __init__(self, ledger: Ledger, handle: _TrioHandle[M]) -> None:
        self._ledger = ledger
        self._handle = handle

    def __repr__(self) -> str:
        return f"<aio.ModuleHandle {self.id!r}>"

    @property
    def id(self) -> str:
        """Module id."""
        return self._handle.id

    async def status(self) -> ModuleStatus:
        """Snapshot of the module's state and counters."""
        return await self._ledger._call("read module status", _status, self._handle)

    async def state(self) -> ModuleState:
        """Current lifecycle state."""
        status = await self.status()
        return status.state

    async def wait_state(self, state: ModuleState, *more: ModuleState) -> ModuleState:
        """Wait until the module is in one of the given states. Cancellation: stops waiting."""
        return await self._ledger._call("wait_state", self._handle.wait_state, state, *more)

    @overload
    async def ask(self, fn: Callable[[M, Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T: ...

    @overload
    async def ask(self, fn: Callable[[M, Unpack[Ts]], T], *args: *Ts) -> T: ...

    async def ask(self, fn: Callable[..., Any], *args: Any) -> Any:  # type: ignore[misc]
        """Run `fn(module, *args)` inside the module's actor; return its result
        (`ModuleHandle.ask`). `fn` runs on the trio loop: it is trio code (sync, or async
        using trio), never asyncio code.

        Cancellation: if the ask has not started it is skipped; if it is running it finishes
        and its result is discarded (as in trio).
        """
        return await self._ledger._call("ask", self._handle.ask, fn, *args)


async def _status(handle: _TrioHandle[Any]) -> ModuleStatus:
    return handle.status


class _LedgerContext:
    """The async context manager returned by `open_ledger`."""

    def __init__(
        self,
        config: LedgerConfig,
        storage: StorageBackend | None,
        modules: Sequence[Module | Callable[[], Module] | ModuleSpec[Any]],
        guest: bool,
        clock: trio.abc.Clock | None,
    ) -> None:
        self._engine = LedgerEngine(config, storage)
        for module in modules:
            self._engine.register(module)
        self._guest = guest
        self._clock = clock
        self._ledger: Ledger | None = None
        self._bridge: _Bridge | None = None
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._entered = False  # the block is running
        self._exiting = False
        self._cancelled_block = False  # we cancelled the block: the trio side ended first

    async def __aenter__(self) -> Ledger:
        if self._bridge is not None:
            raise LifecycleError(
                f"ledger {self._engine.config.ledger_id!r} context was already entered; "
                "call aio.open_ledger again to reopen",
                phase=self._engine.phase,
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise EventLoopError(
                "nucleus_actors.aio.open_ledger runs under asyncio; from trio use "
                "nucleus_actors.open_ledger"
            ) from None
        task = asyncio.current_task()
        bridge = _Bridge(self._engine, loop, guest=self._guest, clock=self._clock)
        ledger = Ledger(bridge)
        self._bridge, self._ledger, self._task = bridge, ledger, task
        self._cancelling = task.cancelling() if task is not None else 0

        def on_ready() -> None:
            ledger._open = True
            if not bridge.ready.done():
                bridge.ready.set_result(None)

        bridge.on_finished = self._on_finished
        name = f"nucleus-aio ledger {self._engine.config.ledger_id!r}"
        self._thread = bridge.start(on_ready, name)
        try:
            await bridge.ready
        except asyncio.CancelledError:
            # Cancelled while starting: as in trio, the startup is cancelled (rolled back).
            self._exiting = True
            bridge.send(_EXIT, "cancelled")
            await _wait_uncancellable(bridge.done)
            self._join()
            raise
        if bridge.done.done():
            self._join()
            error = bridge.error
            if error is None:  # pragma: no cover - the trio run ends only after an exit
                error = LifecycleError("the ledger's trio loop ended during startup")
            raise error
        self._entered = True
        return ledger

    def _on_finished(self) -> None:
        """Host loop: the trio side ended. If the block is still running, it is cancelled (as
        the trio `open_ledger` cancels its block when the ledger fails)."""
        assert self._ledger is not None
        self._ledger._open = False
        bridge = self._bridge
        if (
            not self._exiting
            and self._task is not None
            and self._entered
            and bridge is not None
            and bridge.error is not None
        ):
            self._cancelled_block = True
            self._task.cancel(f"ledger {self._engine.config.ledger_id!r} failed")

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()  # its last act was to post `_finished`: it is exiting now
            self._thread = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        bridge = self._bridge
        assert bridge is not None
        self._exiting = True
        if exc is None:
            reason: _Exit = "normal"
        elif isinstance(exc, Exception):
            reason = "raised"
        else:  # CancelledError, KeyboardInterrupt, SystemExit: leave as trio does on cancel
            reason = "cancelled"
        bridge.send(_EXIT, reason)
        # Stopping is bounded by the modules' shutdown deadlines: wait for it through further
        # cancellations (as trio shields the stop), then re-raise what the block raised.
        interrupted = await _wait_uncancellable(bridge.done)
        self._join()
        error = bridge.error
        if self._cancelled_block and self._task is not None:
            # We cancelled the block because the ledger failed: withdraw that cancellation
            # (as asyncio.timeout does) and raise the failure in its place.
            if not isinstance(exc, asyncio.CancelledError):
                # The block ended before the cancellation reached it: absorb it here.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            if self._task.uncancel() > self._cancelling and exc is not None:
                return None  # also cancelled from elsewhere: stay cancelled
        if error is None or isinstance(error, _HostRaised):
            if interrupted and exc is None:
                raise asyncio.CancelledError  # cancelled while stopping: delivered now
            return None
        if exc is not None and not isinstance(exc, Exception | asyncio.CancelledError):
            error.add_note(f"(raised while the block left with {exc!r})")
            return None  # KeyboardInterrupt and SystemExit win, as in trio
        raise error


def open_ledger(
    config: LedgerConfig,
    *,
    storage: StorageBackend | None = None,
    modules: Sequence[Module | Callable[[], Module] | ModuleSpec[Any]] = (),
    _guest: bool = False,
    _clock: trio.abc.Clock | None = None,
) -> _LedgerContext:
    """Open a ledger for asyncio code: `async with aio.open_ledger(config) as ledger:`.

    The ledger runs on its own trio loop in a background thread: `modules` are registered,
    `init_all` and `start_all` run there, then the block gets a `Ledger`. Leaving the block
    stops the ledger as the trio `open_ledger` does (`stop_all` within the modules' shutdown
    deadlines; capped by `LedgerConfig.exit_timeout` when the block is left by cancellation
    or KeyboardInterrupt), waits for the thread to end, and re-raises what the block raised.
    If the ledger fails while the block runs (the supervisor escalated), the block is
    cancelled and `LedgerFailed` is raised out of it.

    Cancellation: while opening, the startup is cancelled (modules initialized so far are
    stopped) and `CancelledError` is raised once the thread has ended; while closing, the stop
    goes on to its end (it is bounded) and the cancellation is raised afterwards.

    Raises:
        ModuleError: a module's init or start failed (nothing is left running).
        RegistryError / TypeError / ValueError: as `LedgerEngine.register` (at once).
        StorageError: the storage cannot be opened.
        LedgerFailed: the ledger failed while the block ran.
        EventLoopError: entered outside asyncio (under trio, use `nucleus_actors.open_ledger`).
    """
    # `_guest` (trio guest mode on the host loop instead of a thread) exists for
    # benchmarks/bench_aio.py, which measures both designs; `_clock` for tests.
    return _LedgerContext(config, storage, modules, _guest, _clock)


async def run_in_host(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """From trio code of a bridged ledger (a module's hook, an `ask` function): run
    `await fn(*args)` as a task on the asyncio loop that opened the ledger; return its result.

    Use it to hand work to the host application (notify websockets, use an asyncio client).
    Cancellation: the host task is cancelled, and the trio side waits until it has finished.

    Raises:
        EventLoopError: not called from the trio loop of a ledger opened by `aio.open_ledger`.
    """
    try:
        loop = _HOST_LOOP.get()
    except LookupError:
        raise EventLoopError(
            "run_in_host needs the trio loop of a ledger opened with "
            "nucleus_actors.aio.open_ledger (it hands work to that ledger's asyncio loop)"
        ) from None
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the trio run ended meanwhile
            token.run_sync_soon(done.set)

    coro = fn(*args)
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:
        coro.close()
        raise
    future.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        future.cancel()
        with trio.CancelScope(shield=True):
            await done.wait()
        raise
    return future.result()
