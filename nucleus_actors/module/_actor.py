"""The actor behind each registered module: one task per incarnation, one mailbox for life.

An incarnation is one run of a module instance, from `init` (or a restart's `boot`) until it
stops, crashes, exits or is killed. The actor processes its mailbox one message at a time, so
every callback of a module runs in that task, never two at once. It never writes the module's
state: it reports events to its host (the supervisor), synchronously so that the state is
right before the next message is handled: `initialized`, `started`, `crash_detected` (a
callback raised or timed out and its caller is about to learn it) and, when an incarnation
ends, `child_ended` with its `Outcome`. The supervisor decides what happens next.
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol

import trio
from trio_util import AsyncValue

from .. import _instrument, _transitions
from .._groups import leaves
from .._instrument import CallbackCall, Instrument
from ..errors import ModuleError, RecordRejected, RegistryError, StorageError
from ..lifecycle import ModuleState, StopResult
from ..record import Record
from ._base import Module
from ._context import LedgerReader, ModuleContext
from ._isolation import Isolation, decode_error, dumps
from ._mailbox import Ask, Before, Delivery, Lifecycle, LifecycleOp, Mailbox, Reply
from ._proxy import WorkerProxy
from ._spec import ModuleSpec, Overflow, resolved_overflow

__all__ = ["Child", "ChildHost", "Outcome"]

log = logging.getLogger("nucleus_actors.supervisor")

CATCH_UP_CHUNK = 256
"""Entries a durable module reads from storage at a time while it catches up."""

WORKER_START_TIMEOUT = 30.0
"""Seconds an isolated module's worker process may take to start (or its `timeout`, if
longer), before its `init` runs under the module's timeout."""


class Outcome(enum.Enum):
    """How an incarnation ended."""

    STOPPED = "stopped"  # processed a stop message (`stop` ran; error set if it raised)
    CRASHED = "crashed"  # a callback or background task raised, or a callback timed out
    EXITED = "exited"  # ctx.exit(), or essential background work returned
    KILLED = "killed"  # cancelled by the supervisor (shutdown 0 or deadline passed)
    BOOT_FAILED = "boot_failed"  # init or start failed (the requester got the error)


class ChildHost(Protocol):
    """What an actor needs from its supervisor: where it runs, and where it reports events."""

    ledger_id: str
    ledger_reader: LedgerReader
    registry_view: Any
    instruments: list[Instrument]
    saved_cursors: dict[str, int]
    cursor_dirty: trio.Event

    def initialized(self, child: Child) -> None: ...

    def started(self, child: Child) -> None: ...

    def child_ended(
        self, child: Child, incarnation: int, outcome: Outcome, error: BaseException | None
    ) -> None: ...

    def crash_detected(self, child: Child) -> None: ...


class _Crash(Exception):
    """Internal: unwinds an incarnation after a callback crashed (cause: the module's error)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


def crash_cause(exc: BaseException) -> BaseException | None:
    """The module error inside whatever an incarnation raised; None for pure cancellation.

    Non-`Exception` errors other than `Cancelled` (KeyboardInterrupt, SystemExit) are not
    crashes either: they must propagate, so None is returned for them too.
    """
    found = leaves(exc)
    if any(not isinstance(e, (Exception, trio.Cancelled)) for e in found):
        return None
    for leaf in found:
        if isinstance(leaf, _Crash):
            return leaf.cause
        if isinstance(leaf, Exception):
            return leaf
    return None


def _collect(into: list[Any]) -> Callable[[int, Any], None]:
    """An `on_result` that keeps the results in `into`."""
    return lambda _, value: into.append(value)


async def _no_hook(*_: Any) -> None:  # pragma: no cover - never called
    raise AssertionError("an isolated module's hooks run in its worker (in batches)")


class _RemoteModule:
    """The parent's stand-in for an isolated module: each callback runs in the worker."""

    def __init__(self, worker: WorkerProxy) -> None:
        self._worker = worker

    async def _lifecycle(self, op: str) -> Any:
        ok, value = await self._worker.call(op, None)
        if not ok:
            raise decode_error(value[1])
        return value

    async def init(self, ctx: ModuleContext) -> None:
        await self._lifecycle("init")

    async def start(self, ctx: ModuleContext) -> None:
        await self._lifecycle("start")

    async def stop(self, ctx: ModuleContext) -> None:
        await self._lifecycle("stop")

    async def resume_after(self, ctx: ModuleContext) -> Any:
        return await self._lifecycle("resume_after")

    after_append = before_append = staticmethod(_no_hook)  # batches go through _remote_hook


class Child:
    """One registered module: spec, current instance, mailbox, counters and its actor task."""

    def __init__(
        self,
        *,
        module_id: str,
        spec: ModuleSpec[Any],
        instance: Module,
        factory: Callable[[], Module] | None,
        host: ChildHost,
    ) -> None:
        self.id = module_id
        self.spec = spec
        self.factory = factory
        self.instance = instance
        self.host = host
        self.mailbox = Mailbox(spec.inbox, self._overflowed)
        self.overflow: Overflow = resolved_overflow(spec)
        # Durable delivery: the next seq this module processes, whether a start position was
        # established, and the position last stored as its cursor (runtime-kept cursors).
        self.durable = spec.durable
        self.next_seq = 0
        self.positioned = False
        self.saved_position: int | None = None
        self.last_seq: int | None = None  # non-durable: the last seq it processed
        # Stall detection (`_stall.py`): the frame of the live incarnation's task and the
        # callback it is in ("" between callbacks), plain writes read by a watchdog thread.
        self.run_frame: Any = None
        self.step = ""
        self.stalls = 0  # written by the watchdog thread only
        # Written only by `_transitions` (the supervisor's transition table).
        self.state: ModuleState
        self.state_value: AsyncValue[ModuleState]
        _transitions.register(self)
        self.restarts = 0
        self.crashes = 0
        self.processed = 0
        self.last_error: str | None = None
        self.stop_result: StopResult | None = None
        self.incarnation = 0
        self.armed = False  # started at least once: before_append is fail-closed from then on
        self.crashing = False  # a crash was detected and shown in `state` before unwinding
        self.removed = False
        self.consecutive = 0  # consecutive restarts, for backoff
        self.running_since: float | None = None
        self.last_run = 0.0  # seconds its last RUNNING period lasted (for backoff resets)
        self.alive = False
        self._done = trio.Event()
        self._done.set()
        self._scope: trio.CancelScope | None = None
        self._kill_requested = False
        self._exit_requested = False
        self._external_crash: BaseException | None = None
        # Hook timeouts: the actor stamps each hook's start; a watchdog task per incarnation
        # crashes the incarnation if the same hook is still running `timeout` seconds later.
        # (Far cheaper than a cancel scope with a fresh deadline for every record.)
        self._hook_started = math.inf  # trio time the running hook started; inf: none
        self._hook_name = ""
        self._hook_timeout: TimeoutError | None = None  # set by the watchdog when it fires
        self._stopping = False  # the stop lifecycle message is being handled
        self._unwinding = False  # the incarnation's scope has exited: it is ending
        self._lifecycle_msg: Lifecycle | None = None  # lifecycle request being handled
        self._lifecycle_step = ""  # "init", "start" or "stop": the callback it is in
        self._interrupted_asks: list[Reply] = []  # asks cut short by the incarnation ending
        self._now: Callable[[], float] = trio.current_time
        # Isolation: the worker of the live incarnation (PROCESS modules), what it imports
        # and its config as JSON (both checked at register by the supervisor).
        self.isolated = spec.isolation is Isolation.PROCESS
        self.worker: WorkerProxy | None = None
        self.target = ""
        self.config_json = "{}"
        self._refresh_hooks()

    # -- identity and hooks ----------------------------------------------------------------
    @property
    def version(self) -> str:
        return str(getattr(self.instance, "version", "0.0.0"))

    def _refresh_hooks(self) -> None:
        cls = type(self.instance)
        self.has_before = cls.overrides("before_append")
        self.has_after = cls.overrides("after_append")
        self.owns_position = cls.overrides("resume_after")

    @property
    def cursor(self) -> int | None:
        """Highest seq processed (durable: its position), None if nothing yet."""
        if self.durable:
            return self.next_seq - 1 if self.next_seq > 0 else None
        return self.last_seq

    @property
    def lag(self) -> int:
        """Committed entries not yet processed (non-durable: deliveries still queued)."""
        if self.durable:
            return max(0, self.host.ledger_reader.state.length - self.next_seq)
        return self.mailbox.depth

    def _instruments(self) -> tuple[Instrument, ...]:
        """The instruments of the current instance: the ledger's, then the instance's own."""
        attached = _instrument.attached_instruments(self.instance)
        engine_wide = self.host.instruments
        return (*engine_wide, *attached) if engine_wide else attached

    def _call(self, name: str, record: Record | None = None, digest: Any = None) -> CallbackCall:
        worker = self.worker
        return CallbackCall(
            module_id=self.id,
            callback=name,
            incarnation=self.incarnation,
            record=record,
            hash=digest,
            pid=None if worker is None else worker.pid,
        )

    def _observe_background(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`ctx.spawn`'s work with the instruments around it: `before_callback` now (at
        spawn, in the actor, in a deterministic order), the rest when the task runs."""
        instruments = self._instruments()
        if not instruments:
            return fn
        call = self._call("background")
        injections = _instrument.begin(instruments, call)

        async def work(*args: Any) -> Any:
            return await _instrument.run(instruments, call, injections, fn, *args)

        work.__qualname__ = getattr(fn, "__qualname__", "work")
        return work

    async def _stop_callback(self, instance: Module, ctx: ModuleContext) -> None:
        instruments = self._instruments()
        self.step = "stop"
        try:
            if instruments:
                await _instrument.observed(instruments, self._call("stop"), instance.stop, ctx)
            else:
                await instance.stop(ctx)
        finally:
            self.step = ""

    def renew_instance(self) -> None:
        """A fresh instance from the factory (if any) for the next incarnation.

        Raises:
            Exception: whatever the factory raised; RegistryError if it returned a non-Module
                or a module with another id (the caller treats either as a crash).
        """
        if self.factory is None:
            return
        instance = self.factory()
        if isinstance(instance, Module) and self.spec.id is not None:
            instance.id = self.spec.id
        if not isinstance(instance, Module):
            raise RegistryError(
                f"factory of module {self.id!r} returned {type(instance).__name__}, not a Module",
                module_id=self.id,
            )
        new_id = getattr(instance, "id", None)
        if new_id != self.id:
            raise RegistryError(
                f"factory of module {self.id!r} returned a module with id {new_id!r}: "
                "every incarnation must keep its id",
                module_id=self.id,
            )
        self.instance = instance
        self._refresh_hooks()

    def module_error(self, what: str, cause: BaseException | None) -> ModuleError:
        detail = f": {cause!r}" if cause is not None else ""
        err = ModuleError(f"module {self.id!r} {what}{detail}", module_id=self.id)
        err.__cause__ = cause
        return err

    # -- control from the supervisor -------------------------------------------------------
    def launch(self, nursery: trio.Nursery, op: LifecycleOp) -> Lifecycle:
        """Start a new incarnation that first runs lifecycle `op` ("init" or "boot").

        The op is handed to the task directly, not queued: nothing in the mailbox (such as a
        redelivery) can run before it. Returns the message whose reply to await.

        Not `nursery.start`: if the caller were cancelled before the task called `started()`,
        trio would keep the (shielded, long-lived) actor in start's temporary nursery and the
        caller would wait for it forever. The actor's cancel scope is made here instead, so
        `kill()` works even before the task first runs.
        """
        assert not self.alive, f"module {self.id!r} already has a live incarnation"
        self.incarnation += 1
        self._kill_requested = False
        self._exit_requested = False
        self._external_crash = None
        self._hook_timeout = None
        self._stopping = False
        self._unwinding = False
        self._lifecycle_msg = None
        self._done = trio.Event()
        self.crashing = False
        self.alive = True
        self.mailbox.reopen()
        if self.durable:  # it catches up from its position instead
            self.mailbox.discard_deliveries()
        first = Lifecycle(op)
        self._lifecycle_msg = first  # answered by _run however the incarnation ends
        self._lifecycle_step = "init"  # both "init" and "boot" begin with init
        # Shielded: only the supervisor ends an incarnation (kill, crash, exit). An outer
        # cancellation of the ledger must not kill modules before stop_all stops them in
        # reverse order; the engine kills whatever is left when it closes.
        self._scope = trio.CancelScope(shield=True)
        nursery.start_soon(
            self._run, self.incarnation, self.instance, first, self._scope, name=f"module {self.id}"
        )
        return first

    def kill(self) -> None:
        """Cancel the live incarnation (no `stop`); see `wait_done`."""
        if self.alive:
            self._kill_requested = True
            if self._scope is not None:
                self._scope.cancel()

    def crash_now(self, error: BaseException) -> None:
        """Crash the live incarnation from outside (inbox overflow with Overflow.FAIL)."""
        if self._unwinding:
            return  # it is ending already; do not cut its best-effort stop short
        if self.alive and not self._kill_requested and self._external_crash is None:
            self._external_crash = error
            if self._scope is not None:
                self._scope.cancel()

    def _overflowed(self) -> None:
        self.crash_now(
            self.module_error(
                f"overflowed its inbox of {self.spec.inbox} deliveries (overflow=FAIL)", None
            )
        )

    def _request_exit(self, incarnation: int) -> None:
        # While `stop` runs the module is ending anyway: background work that returns because
        # `stop` told it to must not cancel that `stop` (it would then run again).
        if self._stopping or self._unwinding:
            return
        if self.alive and incarnation == self.incarnation and not self._exit_requested:
            self._exit_requested = True
            if self._scope is not None:
                self._scope.cancel()

    def withdraw_queued_stop(self) -> bool:
        """Withdraw a stop still waiting in the inbox (not yet running); True if there was one.

        Used when supervision is abandoned mid group-restart: a sibling that was about to be
        stopped for the restart keeps running, so `stop_all` can drain it first.
        """
        if not self.alive or self._stopping or not self.mailbox.has_lifecycle():
            return False
        self.mailbox.drop_lifecycle(
            ModuleError(f"module {self.id!r}: stop withdrawn (the restart was abandoned)")
        )
        return True

    async def wait_done(self) -> None:
        """Wait until no incarnation is running."""
        await self._done.wait()

    # -- the incarnation -------------------------------------------------------------------
    async def _run(
        self,
        incarnation: int,
        instance: Module,
        first: Lifecycle,
        scope: trio.CancelScope,
    ) -> None:
        if not self.isolated:
            await self._incarnation(incarnation, instance, first, scope)
            return
        # Isolated: the worker's reader and requests live in a nursery of their own that
        # outlasts the incarnation's scope (the best-effort `stop` after a crash needs it);
        # shielded, as the incarnation is: only the supervisor ends it.
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                worker = self.worker = WorkerProxy(self, incarnation, nursery)
                try:
                    await self._incarnation(incarnation, _RemoteModule(worker), first, scope)  # type: ignore[arg-type]
                finally:
                    nursery.cancel_scope.cancel()

    async def _close_worker(self) -> None:
        worker = self.worker
        if worker is not None:
            with trio.CancelScope(shield=True):
                await worker.close()

    def _kill_worker(self, reason: str) -> None:
        if self.worker is not None:
            self.worker.kill(reason)

    async def _incarnation(
        self,
        incarnation: int,
        instance: Module,
        first: Lifecycle,
        scope: trio.CancelScope,
    ) -> None:
        host = self.host
        ctx = ModuleContext(
            ledger_id=host.ledger_id,
            module_id=self.id,
            config=self.spec.config,
            ledger=host.ledger_reader,
            modules=host.registry_view,
            incarnation=incarnation,
            exit=lambda: self._request_exit(incarnation),
        )
        ctx._observe = self._observe_background
        outcome: Outcome | None = None
        error: BaseException | None = None
        self.run_frame = sys._getframe()  # the stall watchdog finds this task by it
        try:
            with scope:
                try:
                    async with trio.open_nursery() as background:
                        ctx._nursery = background
                        self._now = trio.lowlevel.current_clock().current_time
                        timeout = self.spec.timeout
                        if timeout is not None:
                            if self.isolated:  # hook batches report progress every timeout/8
                                timeout += timeout / 8
                            background.start_soon(self._watchdog, timeout)
                        outcome, error = await self._serve(instance, ctx, first)
                        background.cancel_scope.cancel()
                except BaseException as exc:
                    cause = crash_cause(exc)
                    if cause is None:
                        raise
                    outcome, error = Outcome.CRASHED, cause
                finally:
                    ctx._nursery = None
            self._unwinding = True
            if self._kill_requested:
                outcome, error = Outcome.KILLED, None
            elif outcome is None:
                if self._external_crash is not None:
                    outcome, error = Outcome.CRASHED, self._external_crash
                elif self._hook_timeout is not None:
                    outcome, error = Outcome.CRASHED, self._hook_timeout
                elif self._exit_requested:
                    outcome = Outcome.EXITED
                else:  # pragma: no cover - our scope is only cancelled by the three above
                    outcome = Outcome.KILLED
            pending, self._lifecycle_msg = self._lifecycle_msg, None
            if pending is not None and outcome in (Outcome.CRASHED, Outcome.EXITED):
                # It ended while init/start/stop ran (a background task crashed, ctx.exit()):
                # answer the requester, who decides (rollback, a new restart, a stop error).
                step = self._lifecycle_step
                cause = error or ModuleError(
                    f"module {self.id!r} exited during {step}", module_id=self.id
                )
                if step == "start":
                    await self._best_effort_stop(instance, ctx)  # it was initialized
                pending.reply.fail(self.module_error(f"{outcome.value} during {step}", cause))
                outcome, error = (
                    (Outcome.STOPPED, cause) if step == "stop" else (Outcome.BOOT_FAILED, cause)
                )
            elif outcome in (Outcome.CRASHED, Outcome.EXITED):
                await self._best_effort_stop(instance, ctx)
            if pending is not None:
                pending.reply.fail(
                    self.module_error(f"was cancelled during {self._lifecycle_step}", None)
                )
            asks, self._interrupted_asks = self._interrupted_asks, []
            for reply in asks:
                reply.fail(self.module_error(f"{outcome.value} while answering an ask", error))
        finally:
            self._scope = None
            self.alive = False
            self.run_frame = None
            # Whatever is still waiting on this incarnation gets an answer, however it ended.
            leftover = self.module_error(f"incarnation {incarnation} ended abruptly", None)
            if self._lifecycle_msg is not None:
                self._lifecycle_msg.reply.fail(leftover)
                self._lifecycle_msg = None
            for reply in self._interrupted_asks:
                reply.fail(leftover)
            self._interrupted_asks = []
            await self._close_worker()  # no worker outlives its incarnation
            # Lifecycle messages still queued were addressed to this incarnation.
            self.mailbox.drop_lifecycle(
                ModuleError(
                    f"module {self.id!r} incarnation {incarnation} ended before it handled "
                    "this request",
                    module_id=self.id,
                )
            )
            self._done.set()
        assert outcome is not None
        host.child_ended(self, incarnation, outcome, error)

    async def _best_effort_stop(self, instance: Module, ctx: ModuleContext) -> None:
        """`stop` after a crash or exit: bounded by `shutdown`, errors logged, never raised."""
        shutdown = self.spec.shutdown
        if shutdown == 0 or self._kill_requested:
            return
        if self.worker is not None and not self.worker.usable:
            return  # its worker is gone (it died, or was killed for a timeout): nothing to stop
        previous = self._scope
        with trio.CancelScope(shield=True) as scope:
            self._scope = scope  # kill() during this stop cancels it
            if shutdown is not None:
                scope.deadline = trio.current_time() + shutdown
            try:
                await self._stop_callback(instance, ctx)
            except Exception:
                log.warning("module %r: stop after a crash raised", self.id, exc_info=True)
            finally:
                self._scope = previous
        if scope.cancelled_caught:
            log.warning("module %r: stop after a crash overstayed shutdown=%s", self.id, shutdown)

    async def _serve(
        self, instance: Module, ctx: ModuleContext, first: Lifecycle
    ) -> tuple[Outcome, BaseException | None]:
        ended = await self._lifecycle(instance, ctx, first)
        if ended is not None:
            return ended
        mailbox = self.mailbox
        durable = self.durable
        handled = 0
        while True:
            if durable and mailbox.lagging and mailbox.empty:
                await self._lag_chunk(instance)
                continue
            msg = await mailbox.get()
            kind = type(msg)
            if kind is tuple:
                if durable:
                    await self._durable_deliveries(instance, msg)
                else:
                    await self._deliveries(instance, msg)
            elif kind is Before:
                await self._before(instance, msg)
            elif kind is Ask:
                await self._ask(instance, msg)
            else:
                ended = await self._lifecycle(instance, ctx, msg)
                if ended is not None:
                    return ended
            handled += 1
            if handled >= 32:  # a long queue of instant callbacks still lets others run
                handled = 0
                await trio.lowlevel.checkpoint()

    async def _watchdog(self, limit: float) -> None:
        """Crash the incarnation if one hook runs longer than `limit` s (the module's timeout).

        Hooks only stamp their start (`_hook_started`). This task sleeps until the running
        hook's deadline and fires only if the stamp has not changed: the hook running then
        started at that very instant, so it has run for `limit` (a hook that started later
        has a later stamp, and the watchdog waits for that one's deadline instead). When no
        hook runs it looks again after `limit` (a hook starting meanwhile is then found with
        its own deadline still ahead).
        """
        while True:
            started = self._hook_started
            if started == math.inf:
                await trio.sleep(limit)
                continue
            await trio.sleep_until(started + limit)
            if self._hook_started == started:
                self._hook_timeout = self._timed_out(self._hook_name)
                self._kill_worker(f"{self._hook_name} overran the timeout")
                if self._scope is not None:
                    self._scope.cancel()
                return

    def _deadline(self) -> float:
        timeout = self.spec.timeout
        return math.inf if timeout is None else trio.current_time() + timeout

    def _timed_out(self, callback: str) -> TimeoutError:
        return TimeoutError(f"{callback} exceeded the module's timeout of {self.spec.timeout} s")

    def _after_hook(self, instance: Module) -> Callable[[Record, Any], Awaitable[None]]:
        hook: Callable[[Record, Any], Awaitable[None]] = instance.after_append
        instruments = self._instruments()
        if instruments:
            raw_after = hook

            async def observed_after(record: Record, digest: Any) -> None:
                call = self._call("after_append", record, digest)
                await _instrument.observed(instruments, call, raw_after, record, digest)

            hook = observed_after
        return hook

    def _hook_failed(self, exc: BaseException) -> NoReturn:
        """Raise again what cut hook work short, first telling the supervisor of a crash.

        An error from the work is a crash of the module and goes on as `_Crash` (one that
        already is a `_Crash` goes on as it is). Anything else (cancellation) goes on as it
        is, and is a crash too if the watchdog timed the hook out.
        """
        if isinstance(exc, Exception) and not isinstance(exc, _Crash):
            self.host.crash_detected(self)
            raise _Crash(exc) from exc
        if self._hook_timeout is not None:
            self.host.crash_detected(self)
        raise exc

    def _before_failed(self, msg: Before, exc: BaseException) -> NoReturn:
        """`_hook_failed` for a before_append batch, whose caller gets the module's error.

        A crash or a timeout is the batch's last result; the caller is woken only once the
        supervisor knows (state first: the caller may look at it). With fewer results than
        records, the rest waits for a restart (or fails).
        """
        if isinstance(exc, Exception):
            msg.results.append(self.module_error("crashed in before_append", exc))
        elif self._hook_timeout is not None:
            msg.results.append(self.module_error("timed out in before_append", self._hook_timeout))
        try:
            self._hook_failed(exc)
        finally:
            msg.reply.set()

    # -- durable delivery --------------------------------------------------------------------
    async def _position(self, instance: Module, ctx: ModuleContext) -> BaseException | None:
        """Set where a durable module resumes (after init, before start); an error is a crash.

        `resume_after()` if the module defines it, else the position of its previous
        incarnation, else the cursor stored for it, else `start_at`. The inbox was discarded
        at launch: it catches up from the position + 1, then takes live deliveries.
        """
        length = self.host.ledger_reader.state.length
        after: int | None
        if self.owns_position:
            instruments = self._instruments()
            with trio.CancelScope(deadline=self._deadline()) as scope:
                self.step = "resume_after"
                try:
                    if instruments:
                        after = await _instrument.observed(
                            instruments, self._call("resume_after"), instance.resume_after, ctx
                        )
                    else:
                        after = await instance.resume_after(ctx)
                except Exception as exc:
                    return exc
                finally:
                    self.step = ""
            if scope.cancelled_caught:
                self._kill_worker("resume_after overran the timeout")
                return self._timed_out("resume_after")
            if after is not None and (type(after) is not int or after < -1):
                return TypeError(f"resume_after must return an int >= -1 or None, got {after!r}")
        elif self.positioned:
            after = self.next_seq - 1
        else:
            after = self.host.saved_cursors.get(self.id)
            self.saved_position = after
        if after is not None and after >= length:
            return ValueError(
                f"module {self.id!r} resumes after seq {after}, beyond the head of ledger "
                f"{self.host.ledger_id!r} (last seq {length - 1})"
            )
        if after is None:
            after = -1 if self.spec.start_at == "start" else length - 1
        self.next_seq = after + 1
        self.positioned = True
        self.mailbox.lagging = True  # catch up to the head before waiting for deliveries
        return None

    async def _durably(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run durable delivery work; an error in it (hook or storage read) is a crash."""
        self._hook_name = self.step = "after_append"
        try:
            await work()
        except BaseException as exc:
            self._hook_failed(exc)
        finally:
            self._hook_started = math.inf
            self.step = ""

    async def _durable_one(
        self, hook: Callable[[Record, Any], Awaitable[None]], record: Record, digest: Any
    ) -> None:
        self._hook_started = self._now()
        await hook(record, digest)
        self._hook_started = math.inf
        self.next_seq += 1  # callers pass the record at seq next_seq
        self.processed += 1
        if not self.owns_position:
            dirty = self.host.cursor_dirty
            if not dirty.is_set():
                dirty.set()

    async def _catch_up(self, hook: Callable[[Record, Any], Awaitable[None]], stop: int) -> None:
        """Process [next_seq, stop) read from storage, a chunk at a time."""
        reader = self.host.ledger_reader
        while self.next_seq < stop:
            start = self.next_seq
            end = min(stop, start + CATCH_UP_CHUNK)
            chunk = [entry async for entry in reader.read(start, end)]
            if self.worker is not None:
                items: list[Delivery] = []
                for entry in chunk:
                    if entry.seq != start + len(items):
                        break
                    items.append((entry.record, entry.hash))
                await self._remote_durable(items)
            else:
                for entry in chunk:
                    if entry.seq != self.next_seq:
                        break
                    await self._durable_one(hook, entry.record, entry.hash)
            if self.next_seq < end:
                raise StorageError(
                    f"catch-up of module {self.id!r}: storage returned {len(chunk)} entries "
                    f"for seqs {start} to {end - 1}"
                )

    async def _lag_chunk(self, instance: Module) -> None:
        """The inbox is empty but the module lags: read the next chunk up to the head."""
        head = self.host.ledger_reader.state.length
        if self.next_seq >= head:
            self.mailbox.lagging = False  # anything committed from now on is delivered
            return
        hook = self._after_hook(instance)
        stop = min(head, self.next_seq + CATCH_UP_CHUNK)
        await self._durably(lambda: self._catch_up(hook, stop))

    async def _durable_deliveries(self, instance: Module, first: Delivery) -> None:
        """Live deliveries of a durable module: skip what it already processed, read a gap
        (deliveries not queued, or from before its position) from storage first."""
        if self.worker is not None:
            await self._remote_durable_deliveries(first)
            return
        mailbox = self.mailbox
        hook = self._after_hook(instance)

        async def work() -> None:
            item: Delivery | None = first
            while item is not None:
                record, digest = item
                try:
                    seq = record.seq
                    assert seq is not None  # committed records have their seq
                    if seq > self.next_seq:
                        await self._catch_up(hook, seq)
                    if seq == self.next_seq:
                        await self._durable_one(hook, record, digest)
                finally:
                    mailbox.delivered(1)
                item = mailbox.next_delivery()

        await self._durably(work)

    async def _deliveries(self, instance: Module, first: Delivery) -> None:
        if self.worker is not None:
            await self._remote_deliveries(first)
            return
        mailbox = self.mailbox
        overflow = self.overflow
        hook = self._after_hook(instance)
        now = self._now
        self._hook_name = self.step = "after_append"
        run = mailbox.take_deliveries(first, overflow)
        done = 0
        try:
            while True:
                for record, digest in run:
                    self._hook_started = now()
                    await hook(record, digest)
                    done += 1
                self.processed += done
                if done:
                    self.last_seq = run[done - 1][0].seq
                mailbox.delivered(done)
                next_item = mailbox.next_delivery()
                if next_item is None:
                    return
                run, done = mailbox.take_deliveries(next_item, overflow), 0
        except BaseException as exc:
            self.processed += done
            if done:
                self.last_seq = run[done - 1][0].seq
            mailbox.delivered(done)
            mailbox.give_back(run[done:])  # the failed one is redelivered first, then the rest
            self._hook_failed(exc)
        finally:
            self._hook_started = math.inf
            self.step = ""

    async def _before(self, instance: Module, msg: Before) -> None:
        if self.worker is not None:
            await self._remote_before(msg)
            return
        hook: Callable[[Record], Awaitable[Record | None]] = instance.before_append
        instruments = self._instruments()
        if instruments:
            raw_before = hook

            async def observed_before(record: Record) -> Record | None:
                call = self._call("before_append", record)
                return await _instrument.observed(instruments, call, raw_before, record)

            hook = observed_before

        results = msg.results
        now = self._now
        self._hook_name = self.step = "before_append"
        try:
            for record in msg.records:
                self._hook_started = now()
                try:
                    out = await hook(record)
                except RecordRejected as rejected:
                    rejected.module_id = self.id
                    results.append(rejected)
                    continue
                if out is None:
                    results.append(record)
                elif isinstance(out, Record):
                    results.append(out)
                else:
                    raise TypeError(
                        f"before_append must return a Record or None, got {type(out).__name__}"
                    )
        except BaseException as exc:
            self._before_failed(msg, exc)
        finally:
            self._hook_started = math.inf
            self.step = ""
        msg.reply.set()

    async def _ask(self, instance: Module, msg: Ask) -> None:
        if self.worker is not None:
            await self._remote_ask(instance, msg)
            return
        reply = msg.reply
        if reply.abandoned:
            return
        requeued = False
        try:
            if self.durable and self.next_seq < msg.target:  # served once caught up to it
                hook = self._after_hook(instance)
                try:
                    await self._durably(lambda: self._catch_up(hook, msg.target))
                except BaseException:
                    # A delivery crashed (or the incarnation ended) before the ask's function
                    # ran: the ask waits for the next incarnation, as it would behind a queued
                    # delivery of a non-durable module (a module down for good refuses it).
                    self.mailbox.put_front(msg)
                    requeued = True
                    raise
            with trio.CancelScope(deadline=self._deadline()):
                self.step = "ask"
                try:
                    value = msg.fn(instance, *msg.args)
                    if inspect.isawaitable(value):
                        value = await value
                except Exception as exc:
                    reply.fail(exc)  # the caller's error, not a crash of the module
                    return
                finally:
                    self.step = ""
                reply.set(value)
                return
            cause = self._timed_out("ask")
            self._kill_worker("ask overran the timeout")
            self.host.crash_detected(self)
            reply.fail(self.module_error("timed out in ask", cause))
            raise _Crash(cause)
        finally:
            if not reply.done and not requeued:  # cut short by the incarnation ending
                self._interrupted_asks.append(reply)  # answered with the reason

    async def _start_worker(self) -> BaseException | None:
        """Spawn the worker (before `init`); the error if it does not come up.

        Bounded by `WORKER_START_TIMEOUT` or the module's timeout, whichever is longer: a
        Python process takes a few hundred milliseconds to start on a busy machine, which
        must not count against a short `timeout` meant for the module's callbacks.
        """
        worker = self.worker
        assert worker is not None
        limit = max(WORKER_START_TIMEOUT, self.spec.timeout or math.inf)
        with trio.move_on_after(limit) as scope:
            try:
                await worker.start()
            except Exception as exc:
                return exc
            return None
        assert scope.cancelled_caught
        self._kill_worker("it did not start within the timeout")
        return TimeoutError(
            f"the worker process did not start within the module's timeout of {self.spec.timeout} s"
        )

    async def _callback(
        self, fn: Callable[[ModuleContext], Any], ctx: ModuleContext, name: str
    ) -> BaseException | None:
        instruments = self._instruments()
        with trio.CancelScope(deadline=self._deadline()) as scope:
            self.step = name
            try:
                if instruments:
                    await _instrument.observed(instruments, self._call(name), fn, ctx)
                else:
                    await fn(ctx)
            except Exception as exc:
                return exc
            finally:
                self.step = ""
            return None
        assert scope.cancelled_caught
        self._kill_worker(f"{name} overran the timeout")
        return self._timed_out(name)

    async def _lifecycle(
        self, instance: Module, ctx: ModuleContext, msg: Lifecycle
    ) -> tuple[Outcome, BaseException | None] | None:
        op, reply = msg.op, msg.reply
        self._lifecycle_msg = msg  # answered by _run if the incarnation ends meanwhile
        if op is LifecycleOp.INIT or op is LifecycleOp.BOOT:
            self._lifecycle_step = "init"
            err = await self._start_worker() if self.worker is not None else None
            if err is None:
                err = await self._callback(instance.init, ctx, "init")
            if err is not None:
                self._lifecycle_msg = None
                reply.fail(self.module_error("failed in init", err))
                return Outcome.BOOT_FAILED, err
            if op is LifecycleOp.INIT:
                self.host.initialized(self)
                self._lifecycle_msg = None
                reply.set()
                return None
        if op is LifecycleOp.START or op is LifecycleOp.BOOT:
            self._lifecycle_step = "start"
            err = await self._position(instance, ctx) if self.durable else None
            if err is None:
                err = await self._callback(instance.start, ctx, "start")
            if err is not None:
                await self._best_effort_stop(instance, ctx)  # it was initialized
                self._lifecycle_msg = None
                reply.fail(self.module_error("failed in start", err))
                return Outcome.BOOT_FAILED, err
            # RUNNING before the next message is handled: state and behaviour agree.
            self.host.started(self)
            self._lifecycle_msg = None
            reply.set()
            return None
        assert op is LifecycleOp.STOP, op
        self._lifecycle_step = "stop"
        self._stopping = True
        try:
            await self._stop_callback(instance, ctx)
        except Exception as exc:
            self._lifecycle_msg = None
            reply.fail(self.module_error("failed in stop", exc))
            return Outcome.STOPPED, exc
        self._lifecycle_msg = None
        reply.set()
        return Outcome.STOPPED, None

    # -- isolated modules: callbacks in the worker process ------------------------------------
    async def _remote_hook(
        self, op: str, items: list[Any], on_result: Callable[[int, Any], None]
    ) -> None:
        """Run hook `op` ("after" or "before") over `items` in the worker, in batches.

        `on_result(i, result)` is called in order for every item the worker finished (also
        the ones it reported before a timeout or its death), then the module's error for the
        item it failed on is raised (the worker's death, or what the hook raised). With
        instruments, every item gets its `before_callback` before it is sent; a batch ends
        at the first item an instrument injects into, which then goes alone, between its
        injections.
        """
        name = "after_append" if op == "after" else "before_append"
        instruments = self._instruments()
        count = len(items)
        index = 0
        while index < count:
            calls: list[CallbackCall] = []
            injected: tuple[CallbackCall, list[Any]] | None = None
            end = count
            if instruments:
                end = index
                while end < count:
                    call = self._remote_call(name, items[end])
                    injections = _instrument.begin(instruments, call)
                    end += 1
                    if any(injection is not None for injection in injections):
                        injected = (call, injections)
                        end -= 1
                        break
                    calls.append(call)
            if end > index:
                await self._remote_batch(op, items, index, end, calls, on_result)
            if injected is not None:
                call, injections = injected
                self._hook_started = self._now()  # its injections run under its deadline
                # Its result counts only once the whole observed call returned (an injection
                # at exit that crashes means the module did see it, yet it is redelivered).
                result: list[Any] = []
                alone = functools.partial(
                    self._remote_batch, op, items, end, end + 1, [], _collect(result)
                )
                await _instrument.run(instruments, call, injections, alone)
                on_result(end, result[0])
                end += 1
            index = end

    def _remote_call(self, name: str, item: Any) -> CallbackCall:
        if type(item) is tuple:
            return self._call(name, item[0], item[1])
        return self._call(name, item)

    async def _remote_batch(
        self,
        op: str,
        items: list[Any],
        start: int,
        end: int,
        calls: list[CallbackCall],
        on_result: Callable[[int, Any], None],
    ) -> None:
        """One `call` frame with `items[start:end]` (see `_remote_hook`)."""
        worker = self.worker
        assert worker is not None
        timeout = self.spec.timeout
        tick = None if timeout is None else timeout / 8
        progress: list[Any] = []  # results the worker reported while the batch ran
        now = self._now
        done = 0

        def on_tick(count: int, results: Any) -> None:
            if op == "before":
                progress.extend(results)
            else:
                progress.extend([None] * (count - len(progress)))
            self._hook_started = now()  # the next record of the batch has its own deadline

        def take(results: list[Any]) -> None:
            nonlocal done
            for result in results:
                on_result(start + done, result)
                done += 1

        self._hook_started = now()
        error: BaseException | None = None
        durations: list[float] = []
        try:
            ok, value = await worker.call(op, items[start:end], tick=tick, on_tick=on_tick)
            if ok:
                if op == "after":
                    durations = value
                    results: list[Any] = [None] * (end - start)
                else:
                    results, durations = value
                take(results[done:])
                return
            failed_at, encoded, extra = value
            if op == "after":
                durations = extra
                results = [None] * failed_at
            else:
                results, durations = extra
            take(results[done:failed_at])
            error = decode_error(encoded)
            raise error
        except BaseException as exc:
            if error is None:
                take(progress[done:])
                error = exc
            raise
        finally:
            if calls:
                self._report_batch(calls, done, durations, error)

    def _report_batch(
        self,
        calls: list[CallbackCall],
        done: int,
        durations: list[float],
        error: BaseException | None,
    ) -> None:
        """`after_callback` of every instrument for each call of a batch, from its results."""
        instruments = self._instruments()
        for position, call in enumerate(calls):
            duration = durations[position] if position < len(durations) else 0.0
            if position < done:
                result = _instrument.CallbackResult(
                    outcome=_instrument.CallbackOutcome.RETURNED,
                    duration=duration,
                    error=None,
                    completed=True,
                )
            elif position == done and isinstance(error, Exception):
                result = _instrument.CallbackResult(
                    outcome=_instrument.CallbackOutcome.RAISED,
                    duration=duration,
                    error=error,
                    completed=False,
                )
            else:
                result = _instrument.CallbackResult(
                    outcome=_instrument.CallbackOutcome.CANCELLED,
                    duration=0.0,
                    error=None,
                    completed=False,
                )
            for instrument in instruments:
                instrument.after_callback(call, result)

    async def _remote_deliveries(self, first: Delivery) -> None:
        """`_deliveries` for an isolated module: each run of queued deliveries is one batch."""
        mailbox = self.mailbox
        overflow = self.overflow
        self._hook_name = "after_append"
        run = mailbox.take_deliveries(first, overflow)
        done = 0

        def on_result(index: int, _: Any) -> None:
            nonlocal done
            done += 1

        try:
            while True:
                await self._remote_hook("after", run, on_result)
                self.processed += done
                if done:
                    self.last_seq = run[done - 1][0].seq
                mailbox.delivered(done)
                next_item = mailbox.next_delivery()
                if next_item is None:
                    return
                run, done = mailbox.take_deliveries(next_item, overflow), 0
        except BaseException as exc:
            self.processed += done
            if done:
                self.last_seq = run[done - 1][0].seq
            mailbox.delivered(done)
            mailbox.give_back(run[done:])  # the failed one is redelivered first, then the rest
            self._hook_failed(exc)
        finally:
            self._hook_started = math.inf

    async def _remote_before(self, msg: Before) -> None:
        """`_before` for an isolated module: the whole batch of records in one call."""
        results = msg.results
        records = msg.records
        self._hook_name = "before_append"

        def on_result(index: int, out: Any) -> None:
            if out is None:
                results.append(records[index])
            elif out[0] == "rejected":
                rejected = decode_error(out[1])
                assert isinstance(rejected, RecordRejected)
                rejected.module_id = self.id
                results.append(rejected)
            else:
                results.append(out[1])

        try:
            await self._remote_hook("before", records, on_result)
        except BaseException as exc:
            self._before_failed(msg, exc)
        finally:
            self._hook_started = math.inf
        msg.reply.set()

    async def _remote_durable(self, items: list[Delivery]) -> None:
        """Entries `next_seq ..` (contiguous) of a durable isolated module, in one call."""
        if not items:
            return
        dirty = self.host.cursor_dirty

        def on_result(index: int, _: Any) -> None:
            self.next_seq += 1
            self.processed += 1

        try:
            await self._remote_hook("after", items, on_result)
        finally:
            if not self.owns_position and not dirty.is_set():
                dirty.set()

    async def _remote_durable_deliveries(self, first: Delivery) -> None:
        """`_durable_deliveries` for an isolated module: queued deliveries in batches."""
        mailbox = self.mailbox
        items = [first]
        while (item := mailbox.next_delivery()) is not None:
            items.append(item)

        async def work() -> None:
            try:
                index = 0
                while index < len(items):
                    seq = items[index][0].seq
                    assert seq is not None  # committed records have their seq
                    if seq < self.next_seq:
                        index += 1
                        continue
                    if seq > self.next_seq:
                        await self._catch_up(_no_hook, seq)
                    end = index
                    while end < len(items) and items[end][0].seq == self.next_seq + end - index:
                        end += 1
                    await self._remote_durable(items[index:end])
                    index = end
            finally:
                mailbox.delivered(len(items))

        await self._durably(work)

    async def _remote_ask(self, instance: Module, msg: Ask) -> None:
        """`_ask` for an isolated module: `fn` and its arguments go to the worker by pickle."""
        reply = msg.reply
        if reply.abandoned:
            return
        worker = self.worker
        assert worker is not None
        try:
            if self.durable and self.next_seq < msg.target:  # served once caught up to it
                await self._durably(lambda: self._catch_up(_no_hook, msg.target))
            try:
                blob = dumps((msg.fn, msg.args))
            except Exception as exc:
                error = TypeError(
                    f"ask to isolated module {self.id!r} needs a picklable function and "
                    f"arguments (a top-level function, or a method looked up by name such as "
                    f"{type(self.instance).__name__}.method): {exc}"
                )
                error.__cause__ = exc
                reply.fail(error)
                return
            with trio.CancelScope(deadline=self._deadline()):
                ok, value = await worker.call("ask", blob)
                if ok:
                    reply.set(value)
                else:
                    reply.fail(decode_error(value[1]))  # the caller's error, not a crash
                return
            cause = self._timed_out("ask")
            self._kill_worker("ask overran the timeout")
            self.host.crash_detected(self)
            reply.fail(self.module_error("timed out in ask", cause))
            raise _Crash(cause)
        finally:
            if not reply.done:  # cut short by the incarnation ending: answered with the reason
                self._interrupted_asks.append(reply)
