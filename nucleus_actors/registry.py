"""The module registry of one ledger, which is also its supervisor.

It sequences the lifecycle (`init_all`, `start_all`, `stop_all` in reverse), restarts crashed
modules by their restart type and the ledger's strategy, counts restart intensity per ledger and
escalates when restarts run away. All supervisor operations (a restart round, a dynamic
add/terminate/restart/remove) run one at a time under one lock, as an OTP supervisor handles
one message at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, TypeVarTuple, Unpack, overload

import trio

from .config import LedgerConfig
from .errors import LedgerFailed, LifecycleError, ModuleError, RegistryError
from .lifecycle import ModuleState, Phase
from .module._actor import Child, Outcome
from .module._base import Module
from .module._context import LedgerReader
from .module._hooks import check_hooks
from .module._mailbox import Ask, Lifecycle
from .module._spec import ModuleSpec
from .supervision import IntensityWindow, Restart, Strategy

__all__ = [
    "ModuleCounts",
    "ModuleHandle",
    "ModuleRegistry",
    "ModuleStatus",
    "Statistics",
]

log = logging.getLogger("nucleus_actors.supervisor")

M = TypeVar("M", bound=Module)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_MODULE_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleStatus:
    """Snapshot of one module."""

    id: str
    """Module id."""
    version: str
    """Module version (of the current instance)."""
    state: ModuleState
    """Lifecycle state."""
    restarts: int
    """Times it was restarted (group and manual restarts included)."""
    crashes: int
    """Times it crashed (including failed restarts)."""
    last_error: str | None
    """The last crash or stop error, as `repr`, or None."""
    inbox_depth: int
    """after_append deliveries queued or being processed."""
    processed: int
    """after_append deliveries processed."""
    dropped: int
    """after_append deliveries dropped by its overflow policy."""
    stop_result: str | None
    """How it last stopped: "clean", "error" (stop raised), "cancelled" (overstayed its
    `shutdown`, or `shutdown=0`), "exited" (ended itself), "abandoned" (the ledger stopped
    before its pending restart; its undelivered entries are lost to it), or None if it never
    stopped."""
    incarnation: int
    """1 for the first run, +1 per restart."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModuleCounts:
    """How many modules are in each group of states."""

    specs: int
    """Registered modules."""
    running: int
    """RUNNING."""
    restarting: int
    """RESTARTING."""
    stopped: int
    """STOPPED (or not started yet: REGISTERED, INITIALIZED, STOPPING)."""
    failed: int
    """FAILED."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Statistics:
    """Counters of one ledger since it was opened."""

    appends: int
    """Committed records."""
    rejects: int
    """Records vetoed by a before_append (RecordRejected)."""
    crashes: int
    """Module crashes (a failed restart counts as one)."""
    restarts: int
    """Module restarts: every restart of every module, group and manual ones included."""


class _Counters:
    __slots__ = ("appends", "crashes", "rejects", "restarts")

    def __init__(self) -> None:
        self.appends = 0
        self.rejects = 0
        self.crashes = 0
        self.restarts = 0


class SupervisorHost(Protocol):
    """What the registry needs from the engine that owns it."""

    config: LedgerConfig
    ledger_reader: LedgerReader

    @property
    def phase(self) -> Phase: ...

    def set_phase(self, phase: Phase) -> None: ...

    @property
    def nursery(self) -> trio.Nursery: ...

    def escalated(self, failure: LedgerFailed) -> None: ...


class ModuleHandle(Generic[M]):
    """A typed handle on one registered module: identity, state, status, and `ask`."""

    __slots__ = ("_child",)

    def __init__(self, child: Child) -> None:
        self._child = child

    def __repr__(self) -> str:
        return f"<ModuleHandle {self.id!r} {self.state.name}>"

    @property
    def id(self) -> str:
        """Module id."""
        return self._child.id

    @property
    def version(self) -> str:
        """Version of the current instance."""
        return self._child.version

    @property
    def state(self) -> ModuleState:
        """Current lifecycle state."""
        return self._child.state

    @property
    def status(self) -> ModuleStatus:
        """Snapshot of the module's state and counters."""
        return _status(self._child)

    async def wait_state(self, state: ModuleState, *more: ModuleState) -> ModuleState:
        """Wait until the module is in one of the given states; return that state.

        Returns at once (after a checkpoint) if it already is. Cancellation: just stops waiting.
        """
        wanted = {state, *more}
        child = self._child
        if child.state in wanted:
            await trio.lowlevel.checkpoint()
            return child.state
        value: ModuleState = await child.state_value.wait_value(lambda s: s in wanted)
        return value

    @overload
    async def ask(self, fn: Callable[[M, Unpack[Ts]], Awaitable[T]], *args: *Ts) -> T: ...

    @overload
    async def ask(self, fn: Callable[[M, Unpack[Ts]], T], *args: *Ts) -> T: ...

    async def ask(self, fn: Callable[..., Any], *args: Any) -> Any:  # type: ignore[misc]
        """Run `fn(module, *args)` (sync or async) inside the module's actor; return its result.

        The call is queued behind every message already in the inbox (so it sees every
        after_append delivered before it was sent) and runs serialised with the hooks, bounded
        by the module's `timeout`. An exception from `fn` is raised here and is not a crash.
        An ask sent while the module restarts runs in the new incarnation.

        Cancellation: if the ask has not started it is skipped; if it is running it finishes
        and its result is discarded.

        Raises:
            ModuleError: the module is FAILED, STOPPED or removed, or crashed or timed out
                while answering (then `__cause__` is the crash, `TimeoutError` for a timeout).
        """
        child = self._child
        if child.mailbox.is_shut or child.removed:
            raise ModuleError(
                f"cannot ask module {child.id!r}: it is {child.state.name}"
                + (" (removed)" if child.removed else "")
                + "; ask needs a module that is not stopped or failed",
                module_id=child.id,
            )
        msg = Ask(fn, args)
        child.mailbox.put(msg)
        return await msg.reply.wait()


def _status(child: Child) -> ModuleStatus:
    return ModuleStatus(
        id=child.id,
        version=child.version,
        state=child.state,
        restarts=child.restarts,
        crashes=child.crashes,
        last_error=child.last_error,
        inbox_depth=child.mailbox.depth,
        processed=child.processed,
        dropped=child.mailbox.dropped,
        stop_result=child.stop_result,
        incarnation=child.incarnation,
    )


def check_module_id(module_id: object) -> str:
    """Validate a module id. Raises RegistryError naming the rule and the value."""
    if (
        not isinstance(module_id, str)
        or not module_id
        or len(module_id) > 128
        or not set(module_id) <= _MODULE_ID_CHARS
        or not module_id[0].isalnum()
    ):
        raise RegistryError(
            "module id must be 1..128 letters, digits, '_', '.', '-' starting with a letter "
            f"or digit, got {module_id!r}",
            module_id=module_id if isinstance(module_id, str) else None,
        )
    return module_id


class ModuleRegistry:
    """The modules of one ledger, in start order, and their supervisor.

    Read-only use is public (`get`, iteration, `status`, `counts`); changes go through the
    engine (`register`, `init_all`, ..., `add`, `terminate`, `restart`, `remove`).
    """

    def __init__(self, host: SupervisorHost) -> None:
        self._host = host
        self.ledger_id = host.config.ledger_id
        self.ledger_reader = host.ledger_reader
        self._children: dict[str, Child] = {}
        self._order: list[Child] = []  # start order once resolved, else registration order
        self._counters = _Counters()
        self._lock = trio.Lock()
        self._intensity = IntensityWindow(host.config.max_restarts, host.config.restart_window)
        self._reports_send, self._reports_receive = trio.open_memory_channel[
            tuple[Child, int, BaseException | None]
        ](math.inf)
        self._supervisor_scope: trio.CancelScope | None = None
        self._backoff_scope: trio.CancelScope | None = None
        self._startup_failure: tuple[Child, BaseException] | None = None

    # -- read-only API ---------------------------------------------------------------------
    @property
    def registry_view(self) -> ModuleRegistry:
        return self

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, module_id: object) -> bool:
        return module_id in self._children

    def __iter__(self) -> Iterator[ModuleHandle[Module]]:
        """Handles in start order (registration order before `init_all`)."""
        return (ModuleHandle(child) for child in list(self._order))

    @overload
    def get(self, key: type[M]) -> ModuleHandle[M]: ...

    @overload
    def get(self, key: str) -> ModuleHandle[Module]: ...

    def get(self, key: type[M] | str) -> ModuleHandle[M] | ModuleHandle[Module]:
        """The handle of a module, by id or by class (matched with `isinstance`).

        Raises:
            RegistryError: no such module, or several modules are instances of that class.
        """
        if isinstance(key, str):
            child = self._children.get(key)
            if child is None:
                raise RegistryError(
                    f"no module with id {key!r} (registered: {sorted(self._children)})",
                    module_id=key,
                )
            return ModuleHandle(child)
        if not (isinstance(key, type) and issubclass(key, Module)):
            raise RegistryError(f"get() takes a module id or a Module subclass, got {key!r}")
        matches = [c for c in self._order if isinstance(c.instance, key)]
        if not matches:
            raise RegistryError(f"no module is an instance of {key.__qualname__}")
        if len(matches) > 1:
            raise RegistryError(
                f"{len(matches)} modules are instances of {key.__qualname__} "
                f"({[c.id for c in matches]}); get one by id"
            )
        return ModuleHandle(matches[0])

    def status(self) -> list[ModuleStatus]:
        """Snapshots of every module, in start order."""
        return [_status(child) for child in self._order]

    def counts(self) -> ModuleCounts:
        """How many modules are running, restarting, stopped, failed."""
        states = [child.state for child in self._order]
        return ModuleCounts(
            specs=len(states),
            running=states.count(ModuleState.RUNNING),
            restarting=states.count(ModuleState.RESTARTING),
            failed=states.count(ModuleState.FAILED),
            stopped=sum(
                s
                in (
                    ModuleState.STOPPED,
                    ModuleState.REGISTERED,
                    ModuleState.INITIALIZED,
                    ModuleState.STOPPING,
                )
                for s in states
            ),
        )

    def statistics(self) -> Statistics:
        c = self._counters
        return Statistics(
            appends=c.appends, rejects=c.rejects, crashes=c.crashes, restarts=c.restarts
        )

    # -- for the engine's pipeline ---------------------------------------------------------
    @property
    def counters(self) -> _Counters:
        return self._counters

    def before_children(self) -> list[Child]:
        """Modules whose before_append takes part in appends, in start order."""
        return [c for c in self._order if c.armed and c.has_before]

    def after_children(self) -> list[Child]:
        """Modules that get after_append deliveries now, in start order."""
        return [
            c
            for c in self._order
            if c.has_after
            and c.state in (ModuleState.RUNNING, ModuleState.RESTARTING)
            and not c.mailbox.is_shut
        ]

    # -- registration ----------------------------------------------------------------------
    def make_child(self, item: Any, options: dict[str, Any]) -> Child:
        """Build (but do not add) a child from a Module, a factory or a ModuleSpec.

        Raises:
            RegistryError: not a Module/factory/spec, a factory that fails or returns a
                non-Module, a bad or duplicate id.
            ValueError: an option is out of range.
        """
        if isinstance(item, ModuleSpec):
            spec: ModuleSpec[Any] = item
            if options:
                spec = ModuleSpec(
                    item.module,
                    **{
                        name: getattr(item, name)
                        for name in (
                            "restart",
                            "shutdown",
                            "timeout",
                            "inbox",
                            "overflow",
                            "depends_on",
                            "config",
                            "backoff",
                        )
                    }
                    | options,
                )
        else:
            spec = ModuleSpec(item, **options)
        target = spec.module
        factory: Callable[[], Module] | None = None
        if isinstance(target, Module):
            instance = target
        elif callable(target):
            factory = target
            try:
                made = target()
            except Exception as exc:
                raise RegistryError(
                    f"module factory {target!r} raised {exc!r} when called at register"
                ) from exc
            if not isinstance(made, Module):
                raise RegistryError(
                    f"module factory {target!r} returned {type(made).__name__}, not a Module"
                )
            instance = made
        else:
            raise RegistryError(
                f"register() takes a Module, a zero-argument factory or a ModuleSpec, "
                f"got {type(target).__name__}"
            )
        module_id = check_module_id(getattr(instance, "id", None))
        check_hooks(instance, module_id)
        if module_id in self._children:
            raise RegistryError(f"module {module_id!r} is already present", module_id=module_id)
        if module_id in spec.depends_on:
            raise RegistryError(f"module {module_id!r} depends on itself", module_id=module_id)
        return Child(module_id=module_id, spec=spec, instance=instance, factory=factory, host=self)

    def add_child(self, child: Child) -> None:
        self._children[child.id] = child
        self._order.append(child)

    def resolve_order(self) -> None:
        """Registration order, except that a module comes after the modules it depends on.

        Raises:
            RegistryError: unknown dependency or a cycle (before anything runs).
        """
        for child in self._order:
            for dep in child.spec.depends_on:
                if dep not in self._children:
                    raise RegistryError(
                        f"module {child.id!r} depends on unknown module {dep!r}",
                        module_id=child.id,
                    )
        placed: list[Child] = []
        done: set[str] = set()
        remaining = list(self._order)
        while remaining:
            for child in remaining:
                if all(dep in done for dep in child.spec.depends_on):
                    placed.append(child)
                    done.add(child.id)
                    remaining.remove(child)
                    break
            else:
                raise RegistryError(
                    f"dependency cycle: {self._cycle(remaining)}", module_id=remaining[0].id
                )
        self._order = placed

    def _cycle(self, remaining: list[Child]) -> str:
        waiting = {c.id: c for c in remaining}
        path = [remaining[0].id]
        while True:
            nxt = next(d for d in waiting[path[-1]].spec.depends_on if d in waiting)
            if nxt in path:
                return " -> ".join([*path[path.index(nxt) :], nxt])
            path.append(nxt)

    # -- startup ---------------------------------------------------------------------------
    async def _request(self, child: Child, op: str, *, front: bool = True) -> None:
        msg = Lifecycle(op)
        if front:
            child.mailbox.put_front(msg)
        else:
            child.mailbox.put(msg)
        await msg.reply.wait()

    def _check_startup(self) -> None:
        failure = self._startup_failure
        if failure is not None:
            child, error = failure
            raise child.module_error("crashed during startup", error)

    async def init_all(self) -> None:
        """Launch every actor and run `init` in start order; roll back on failure."""
        self.resolve_order()
        try:
            for child in self._order:
                # The actor sets INITIALIZED (then RUNNING) itself, before it handles anything
                # else; setting it here after the reply could overwrite a later crash.
                first = child.launch(self._host.nursery, "init")
                await first.reply.wait()
                self._check_startup()
        except BaseException as exc:
            await self._rollback(exc)
            raise

    async def start_all(self) -> None:
        """Run `start` in start order; roll back on failure."""
        try:
            self._check_startup()
            for child in self._order:
                await self._request(child, "start")
                self._check_startup()
        except BaseException as exc:
            await self._rollback(exc)
            raise

    async def _rollback(self, exc: BaseException) -> None:
        """Stop every live module in reverse order after a startup failure (shielded)."""
        if isinstance(exc, ModuleError) and exc.module_id in self._children:
            failed = self._children[exc.module_id]
            failed.set_state(ModuleState.FAILED)
            failed.last_error = repr(exc.__cause__ or exc)
        log.error("ledger %r: startup failed, rolling back: %s", self.ledger_id, exc)
        self._host.set_phase(Phase.FAILED)
        cap = self._host.config.exit_timeout if not isinstance(exc, Exception) else None
        with trio.CancelScope(shield=True):
            await self._stop_all_children(drain=True, cap=cap, reason="rolled back")

    # -- stopping --------------------------------------------------------------------------
    async def _stop_child(self, child: Child, *, drain: bool, cap: float | None) -> None:
        """Stop one live incarnation: `stop` after draining (or at once), then cancel it if it
        overstays `shutdown` (`None` waits forever unless `cap` is given)."""
        if not child.alive:
            return
        shutdown = child.spec.shutdown
        if shutdown is None:
            shutdown = cap
        if shutdown == 0:
            child.kill()
        else:
            msg = Lifecycle("stop")
            if drain:
                child.mailbox.put_after_deliveries(msg)
            else:
                child.mailbox.put_front(msg)
            with trio.move_on_after(math.inf if shutdown is None else shutdown):
                await child.wait_done()
            if child.alive:
                log.warning(
                    "module %r overstayed its shutdown of %s s: cancelling it", child.id, shutdown
                )
                child.kill()
        await child.wait_done()

    async def _stop_all_children(self, *, drain: bool, cap: float | None, reason: str) -> None:
        """Stop every module in reverse start order; each ends STOPPED (or FAILED)."""
        for child in reversed(self._order):
            if child.alive:
                if child.state not in (ModuleState.RESTARTING, ModuleState.FAILED):
                    child.set_state(ModuleState.STOPPING)
                await self._stop_child(child, drain=drain, cap=cap)
            if child.state is not ModuleState.REGISTERED:
                child.settle_stopped()
            self._shut(child, reason)

    def _shut(self, child: Child, reason: str) -> None:
        child.mailbox.shut(
            ModuleError(
                f"module {child.id!r} is {child.state.name} ({reason}); it takes no messages "
                f"until restart({child.id!r}) or remove({child.id!r})",
                module_id=child.id,
            )
        )

    def cancel_supervisor(self) -> None:
        """Cancel the supervisor task (it is shielded from outer cancellation)."""
        if self._supervisor_scope is not None:
            self._supervisor_scope.cancel()

    async def stop_supervising(self, *, cap: float | None) -> None:
        """Stop restarting (the phase is already STOPPING).

        As an OTP supervisor finishes the restart it is handling before it shuts down, a
        restart round in progress completes first (skipping any backoff wait, and starting no
        further round), so the modules it stopped run again and can be drained and stopped
        in order. That wait is capped by `cap` (when leaving by cancellation); then the
        supervisor task is cancelled, and what it did not restart is abandoned.
        """
        if self._backoff_scope is not None:
            self._backoff_scope.cancel()
        with trio.move_on_after(math.inf if cap is None else cap):
            async with self._lock:
                pass
        self.cancel_supervisor()
        async with self._lock:
            pass

    def abandon_restarts(self) -> None:
        """Supervision stopped: a crashed module waiting for its restart will not get one, and
        a sibling a group restart was about to stop keeps running (so `stop_all` drains it)."""
        for child in self._order:
            if child.state is not ModuleState.RESTARTING:
                continue
            if not child.alive:
                child.stop_result = "abandoned"
                child.last_error = child.last_error or "restart abandoned: the ledger stopped"
                child.set_state(ModuleState.FAILED)
                self._shut(child, "the ledger stopped before its restart")
            elif child.withdraw_queued_stop():
                child.set_state(ModuleState.RUNNING)
            # Otherwise it is booting (it becomes RUNNING or FAILED by itself) or already
            # stopping (it ends STOPPED).

    async def stop_all(self, *, cap: float | None) -> None:
        """Stop every module in reverse start order, each after draining its inbox.

        Cancellation: not handled here; the engine's stop aborts the rest (`abort`).
        """
        await self._stop_all_children(drain=True, cap=cap, reason="stopped")

    async def abort(self) -> None:
        """Cancel every module at once (no `stop`), in reverse order; settle and shut them."""
        with trio.CancelScope(shield=True):
            for child in reversed(self._order):
                child.kill()
                await child.wait_done()
                if child.state is not ModuleState.REGISTERED:
                    child.settle_stopped()
                self._shut(child, "stopped")

    def close(self) -> None:
        """The ledger is closed: every mailbox refuses requests (pending asks fail)."""
        for child in self._order:
            if not child.mailbox.is_shut:
                self._shut(child, "the ledger is closed")

    def longest_shutdown(self, cap: float | None) -> float | None:
        """The longest `shutdown` of any module (`None` ones count as `cap`; None = forever)."""
        limits = [cap if c.spec.shutdown is None else c.spec.shutdown for c in self._order]
        if None in limits:
            return None
        return max([limit for limit in limits if limit is not None], default=0.0)

    def kill_all(self) -> None:
        for child in self._order:
            child.kill()

    # -- crash handling --------------------------------------------------------------------
    def _will_restart(self, child: Child, crashed: bool) -> bool:
        restart = child.spec.restart
        return restart is Restart.PERMANENT or (restart is Restart.TRANSIENT and crashed)

    def crash_detected(self, child: Child) -> None:
        """A callback crashed and its caller is about to learn it: show the outcome in `state`
        now (RESTARTING or FAILED) rather than after the incarnation has unwound."""
        if (
            self._host.phase is Phase.RUNNING
            and child.state is ModuleState.RUNNING
            and not child.removed
        ):
            child.crashing = True
            restarting = self._will_restart(child, crashed=True)
            child.set_state(ModuleState.RESTARTING if restarting else ModuleState.FAILED)

    def child_ended(
        self, child: Child, incarnation: int, outcome: Outcome, error: BaseException | None
    ) -> None:
        """Called by an actor when an incarnation ends (synchronously, in the actor task)."""
        was_running = child.state is ModuleState.RUNNING or child.crashing
        child.crashing = False
        phase = self._host.phase
        if outcome in (Outcome.STOPPED, Outcome.KILLED):
            if outcome is Outcome.KILLED:
                child.stop_result = "cancelled"
            else:
                child.stop_result = "error" if error is not None else "clean"
            if error is not None:
                child.last_error = repr(error)
                log.warning("module %r: stop raised %r", child.id, error)
            if child.state is ModuleState.RESTARTING:
                return  # stopped by a group restart: the round starts it again (even while
                # the ledger stops, the round completes; if abandoned, abandon_restarts settles it)
            if error is not None:
                child.set_state(ModuleState.FAILED)
            elif child.state is not ModuleState.REGISTERED:
                child.settle_stopped()
            self._shut(child, "stopped")
            return
        if outcome is Outcome.BOOT_FAILED:
            assert error is not None
            child.last_error = repr(error)
            child.crashes += 1
            self._counters.crashes += 1
            if phase in (Phase.STOPPING, Phase.STOPPED, Phase.FAILED):
                # Its requester is gone (supervision stopped): nobody will restart it.
                child.set_state(ModuleState.FAILED)
                self._shut(child, "failed to start while the ledger stopped")
            return
        phase = self._host.phase
        if outcome is Outcome.CRASHED:
            assert error is not None
            child.crashes += 1
            self._counters.crashes += 1
            child.last_error = repr(error)
            log.error(
                "module %r crashed (incarnation %d): %r",
                child.id,
                incarnation,
                error,
                exc_info=(type(error), error, error.__traceback__),
            )
        else:
            child.stop_result = "exited"
            log.info("module %r exited (incarnation %d)", child.id, incarnation)
        if phase in (Phase.CREATED, Phase.INITIALIZED):
            if outcome is Outcome.CRASHED and self._startup_failure is None:
                assert error is not None
                self._startup_failure = (child, error)
            child.set_state(
                ModuleState.FAILED if outcome is Outcome.CRASHED else ModuleState.STOPPED
            )
            self._shut(child, "crashed" if outcome is Outcome.CRASHED else "exited")
            return
        if phase is not Phase.RUNNING or not was_running:
            # Stopping, failed, or part of a group restart already: not restarted from here.
            if phase is Phase.RUNNING and child.state is ModuleState.RESTARTING:
                return  # the group restart in progress starts it again
            child.set_state(
                ModuleState.FAILED if outcome is Outcome.CRASHED else ModuleState.STOPPED
            )
            self._shut(child, "crashed" if outcome is Outcome.CRASHED else "exited")
            return
        restart = child.spec.restart
        if self._will_restart(child, crashed=outcome is Outcome.CRASHED):
            child.set_state(ModuleState.RESTARTING)
            self._reports_send.send_nowait((child, incarnation, error))
        else:
            crashed = outcome is Outcome.CRASHED
            child.set_state(ModuleState.FAILED if crashed else ModuleState.STOPPED)
            self._shut(child, f"{restart.name} module {'crashed' if crashed else 'exited'}")

    async def supervise(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The supervisor task: handle crash/exit reports one at a time.

        Shielded: an outer cancellation must not stop supervision half-way; the engine cancels
        it explicitly (`cancel_supervisor`) when it stops or closes.
        """
        with trio.CancelScope(shield=True) as scope:
            self._supervisor_scope = scope
            task_status.started()
            async for child, incarnation, error in self._reports_receive:
                if self._host.phase is not Phase.RUNNING:
                    continue
                async with self._lock:
                    if (
                        child.removed
                        or child.incarnation != incarnation
                        or child.state is not ModuleState.RESTARTING
                    ):
                        continue  # stale: already restarted as part of a group
                    await self._restart_round(child, error)

    def _group(self, crashed: Child) -> list[Child]:
        strategy = self._host.config.strategy
        if strategy is Strategy.ONE_FOR_ONE:
            return [crashed]
        order = self._order
        start = 0 if strategy is Strategy.ONE_FOR_ALL else order.index(crashed)
        return [
            c
            for c in order[start:]
            if c is crashed or c.state in (ModuleState.RUNNING, ModuleState.RESTARTING)
        ]

    def _backoff_delay(self, child: Child) -> float:
        backoff = child.spec.backoff or self._host.config.backoff
        if backoff is None:
            return 0.0
        if child.last_run >= backoff.reset_after:
            child.consecutive = 0  # it stayed RUNNING long enough: start the count again
        child.last_run = 0.0  # a restart that fails never ran
        delay = backoff.delay(child.consecutive)
        child.consecutive += 1
        return max(0.0, delay)

    async def _restart_round(self, crashed: Child, cause: BaseException | None) -> None:
        """Restart `crashed` and its strategy group until it sticks, or escalate."""
        while True:
            if self._host.phase is not Phase.RUNNING:
                return
            if not self._intensity.admit(trio.current_time()):
                await self._escalate(crashed, cause)
                return
            group = self._group(crashed)
            for child in reversed(group):
                if child.state is not ModuleState.RESTARTING:
                    child.set_state(ModuleState.RESTARTING)
                await self._stop_child(child, drain=False, cap=None)
            restartable = []
            for child in group:
                if child is not crashed and child.spec.restart is Restart.TEMPORARY:
                    child.set_state(ModuleState.STOPPED)  # OTP: never restarted, even in a group
                    self._shut(child, "TEMPORARY module stopped by a group restart")
                else:
                    restartable.append(child)
            delay = self._backoff_delay(crashed)
            if delay > 0 and self._host.phase is Phase.RUNNING:
                log.info("restarting module %r in %.3f s (backoff)", crashed.id, delay)
                with trio.CancelScope() as self._backoff_scope:  # stop_all skips the wait
                    await trio.sleep(delay)
                self._backoff_scope = None
            failed: tuple[Child, BaseException | None] | None = None
            for child in restartable:
                error = await self._boot(child)
                if error is not None:
                    failed = (child, error)
                    break
            if failed is None:
                return
            crashed, cause = failed
            crashed.set_state(ModuleState.RESTARTING)

    async def _boot(self, child: Child) -> BaseException | None:
        """Start a new incarnation (fresh instance from a factory) with init + start."""
        child.restarts += 1
        self._counters.restarts += 1
        try:
            child.renew_instance()
        except Exception as exc:
            child.crashes += 1
            self._counters.crashes += 1
            child.last_error = repr(exc)
            log.error("module %r: factory failed on restart: %r", child.id, exc)
            return exc
        first = child.launch(self._host.nursery, "boot")
        try:
            await first.reply.wait()
        except ModuleError as err:
            log.error("module %r: restart failed: %s", child.id, err)
            return err.__cause__ or err
        log.info("module %r restarted (incarnation %d)", child.id, child.incarnation)
        return None

    async def _escalate(self, child: Child, cause: BaseException | None) -> None:
        config = self._host.config
        failure = LedgerFailed(
            f"ledger {self.ledger_id!r} failed: more than {config.max_restarts} restarts "
            f"within {config.restart_window} s; last crash in module {child.id!r}: {cause!r}",
            phase=Phase.FAILED,
        )
        failure.__cause__ = cause
        log.critical("%s", failure)
        self._host.set_phase(Phase.FAILED)
        child.set_state(ModuleState.FAILED)
        with trio.CancelScope(shield=True):
            await self._stop_all_children(
                drain=False, cap=config.exit_timeout, reason="ledger failed"
            )
        self._host.escalated(failure)

    # -- dynamic control -------------------------------------------------------------------
    def _require_running(self, what: str) -> None:
        phase = self._host.phase
        if phase is not Phase.RUNNING:
            raise LifecycleError(
                f"cannot {what}: ledger {self.ledger_id!r} is {phase.name} ({what} needs RUNNING)",
                phase=phase,
            )

    def _lookup(self, module_id: str) -> Child:
        child = self._children.get(module_id)
        if child is None:
            raise RegistryError(f"module {module_id!r} not found", module_id=module_id)
        return child

    async def _wait_unwound(self, child: Child) -> None:
        """A STOPPED/FAILED module may still be finishing its last incarnation (its best-effort
        `stop` after a crash, bounded by `shutdown`): wait for that before acting on it."""
        if child.state in (ModuleState.STOPPED, ModuleState.FAILED) and child.alive:
            await child.wait_done()

    async def add(self, child: Child) -> None:
        """Init + start a new module now; it is last in start order (first to stop)."""
        self._require_running("add a module")
        async with self._lock:
            self._require_running("add a module")
            if child.id in self._children:
                raise RegistryError(f"module {child.id!r} is already present", module_id=child.id)
            for dep in child.spec.depends_on:
                if dep not in self._children:
                    raise RegistryError(
                        f"module {child.id!r} depends on unknown module {dep!r}",
                        module_id=child.id,
                    )
            self.add_child(child)
            try:
                first = child.launch(self._host.nursery, "boot")
                await first.reply.wait()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop_child(child, drain=False, cap=0)
                self._children.pop(child.id, None)
                self._order.remove(child)
                child.removed = True
                child.set_state(ModuleState.FAILED)
                self._shut(child, "add failed")
                raise

    async def terminate(self, module_id: str) -> None:
        """Stop a module (drain, `stop`), keeping its spec; no-op if already stopped/failed."""
        self._require_running("terminate a module")
        child = self._lookup(module_id)
        async with self._lock:
            if child.removed or child.state in (ModuleState.STOPPED, ModuleState.FAILED):
                return
            child.set_state(ModuleState.STOPPING)
            await self._stop_child(child, drain=True, cap=None)
            child.settle_stopped()
            self._shut(child, "terminated")

    async def restart(self, module_id: str) -> None:
        """Start a STOPPED or FAILED module again (fresh instance from a factory).

        Raises:
            RegistryError: not found, or running (terminate it first).
            ModuleError: its init or start failed (it stays FAILED).
        """
        self._require_running("restart a module")
        child = self._lookup(module_id)
        async with self._lock:
            await self._wait_unwound(child)
            if child.state not in (ModuleState.STOPPED, ModuleState.FAILED) or child.alive:
                raise RegistryError(
                    f"cannot restart module {module_id!r}: it is running "
                    f"({child.state.name}); terminate it first",
                    module_id=module_id,
                )
            error = await self._boot(child)
            if error is not None:
                child.set_state(ModuleState.FAILED)
                self._shut(child, "restart failed")
                raise child.module_error("failed to restart", error)

    async def remove(self, module_id: str) -> None:
        """Forget a stopped module's spec (lifting its fail-closed hold on appends).

        Raises:
            RegistryError: not found, or still running.
        """
        self._require_running("remove a module")
        child = self._lookup(module_id)
        async with self._lock:
            await self._wait_unwound(child)
            if child.state not in (ModuleState.STOPPED, ModuleState.FAILED) or child.alive:
                raise RegistryError(
                    f"cannot remove module {module_id!r}: it is running ({child.state.name}); "
                    "terminate it first",
                    module_id=module_id,
                )
            child.removed = True
            del self._children[module_id]
            self._order.remove(child)
            self._shut(child, "removed")
