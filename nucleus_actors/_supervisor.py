"""The supervisor of one ledger: it owns every module's state and the ledger's phase.

As Elixir's `Supervisor` is a thin API over one process that owns all child state, the engine
and the read-only registry view (`registry.py`) are thin layers over this object:

* **Events in.** Actors report what happened (`initialized`, `started`, `crash_detected`,
  `child_ended` with an `Outcome`); the engine reports phase changes (`fire`).
* **Decisions here.** `child_ended` and the restart round decide (by restart type, strategy,
  phase and intensity) and move states only through `_transitions.enter` /
  `PhaseMachine.fire`, the tables of legal transitions.
* **Actions out.** Stop a child (`_stop_child`, by `StopMode`), start one (`_boot`), escalate.

All supervisor operations (a restart round, a dynamic add/terminate/restart/remove) run one at
a time under one lock, as an OTP supervisor handles one message at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from enum import Enum
from typing import Any, Protocol, TypeVar

import trio

from ._instrument import Instrument
from ._order import start_order
from ._transitions import ModuleEvent, PhaseEvent, PhaseMachine, enter
from .config import LedgerConfig
from .errors import LedgerFailed, LifecycleError, ModuleError, RegistryError
from .lifecycle import ModuleState, Phase, StopResult
from .module._actor import Child, Outcome
from .module._base import Module
from .module._context import LedgerReader
from .module._hooks import check_hooks
from .module._isolation import Isolation, import_target, json_config, qualified_target
from .module._mailbox import Lifecycle, LifecycleOp
from .module._spec import ModuleSpec, resolved_overflow
from .registry import ModuleRegistry, check_module_id
from .storage import CursorStore
from .supervision import IntensityWindow, Restart, Strategy

__all__ = ["StopMode", "Supervisor", "SupervisorHost"]

log = logging.getLogger("nucleus_actors.supervisor")

C = TypeVar("C")

_SPEC_FIELDS = (
    "restart",
    "shutdown",
    "timeout",
    "inbox",
    "overflow",
    "depends_on",
    "config",
    "backoff",
    "durable",
    "start_at",
    "isolation",
    "memory_limit",
    "id",
)


class StopMode(Enum):
    """How a live incarnation is asked to stop (then cancelled if it overstays `shutdown`)."""

    DRAIN = "drain"
    """`stop` after every queued delivery ran (stop_all, terminate, rollback)."""
    NOW = "now"
    """`stop` before anything queued (group restarts, escalation, a failed add): the inbox
    survives for the next incarnation."""


class SupervisorHost(Protocol):
    """What the supervisor needs from the engine that owns it."""

    config: LedgerConfig
    _ledger_reader: LedgerReader

    @property
    def _module_nursery(self) -> trio.Nursery: ...

    def _escalated(self, failure: LedgerFailed) -> None: ...

    def require_storage(self, capability: Callable[..., C], feature: str) -> C: ...

    def _phase_changed(self, phase: Phase) -> None: ...


class Supervisor:
    """The modules of one ledger, in start order, their states, and the ledger's phase."""

    def __init__(self, host: SupervisorHost) -> None:
        self._host = host
        self.ledger_id = host.config.ledger_id
        self.ledger_reader = host._ledger_reader
        self.phases = PhaseMachine(host._phase_changed)
        self.children: dict[str, Child] = {}
        self.order: list[Child] = []  # start order once resolved, else registration order
        self.crashes = 0
        self.restarts = 0
        self._lock = trio.Lock()
        self._intensity = IntensityWindow(host.config.max_restarts, host.config.restart_window)
        self._reports_send, self._reports_receive = trio.open_memory_channel[
            tuple[Child, int, BaseException | None]
        ](math.inf)
        self._supervisor_scope: trio.CancelScope | None = None
        self._backoff_scope: trio.CancelScope | None = None
        self._startup_failure: tuple[Child, BaseException] | None = None
        self.registry_view = ModuleRegistry._create(self)
        self.instruments: list[Instrument] = []  # engine.add_instrument: every module's
        self.saved_cursors: dict[str, int] = {}  # durable modules' stored cursors (at open)
        self.cursor_dirty = trio.Event()  # set when a runtime-kept cursor moved
        self._durable = False  # any durable module registered (cursors to keep)

    @property
    def phase(self) -> Phase:
        return self.phases.phase

    def fire(self, event: PhaseEvent) -> Phase:
        """A ledger event (init_all ok, stop, ...): move the phase by the table."""
        return self.phases.fire(event)

    # -- for the engine's pipeline ---------------------------------------------------------
    def before_children(self) -> list[Child]:
        """Modules whose before_append takes part in appends, in start order."""
        return [c for c in self.order if c.armed and c.has_before]

    def after_children(self) -> list[Child]:
        """Modules that get after_append deliveries now, in start order."""
        return [
            c
            for c in self.order
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
                    item.module, **{name: getattr(item, name) for name in _SPEC_FIELDS} | options
                )
        else:
            spec = ModuleSpec(item, **options)
        target: Any = spec.module
        if isinstance(target, str):
            try:
                target = import_target(target)
            except Exception as exc:
                raise RegistryError(
                    f"module {spec.module!r} cannot be imported: {type(exc).__name__}: {exc}"
                ) from exc
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
            if spec.id is not None:
                instance.id = spec.id
        else:
            raise RegistryError(
                f"register() takes a Module, a zero-argument factory or a ModuleSpec, "
                f"got {type(target).__name__}"
            )
        if isinstance(target, Module) and spec.id is not None:
            raise RegistryError(
                f"ModuleSpec.id={spec.id!r} needs a factory (it is set on every instance the "
                "factory makes); set the id on the instance instead",
                module_id=spec.id,
            )
        module_id = check_module_id(getattr(instance, "id", None))
        spec = self._durability(spec, instance, module_id)
        check_hooks(instance, module_id)
        if module_id in self.children:
            raise RegistryError(f"module {module_id!r} is already present", module_id=module_id)
        if module_id in spec.depends_on:
            raise RegistryError(f"module {module_id!r} depends on itself", module_id=module_id)
        isolated = spec.isolation is Isolation.PROCESS
        name = qualified_target(spec.module, module_id) if isolated else ""
        config_json = json_config(spec.config, module_id) if isolated else "{}"
        child = Child(module_id=module_id, spec=spec, instance=instance, factory=factory, host=self)
        child.target = name
        child.config_json = config_json
        return child

    def _durability(
        self, spec: ModuleSpec[Any], instance: Module, module_id: str
    ) -> ModuleSpec[Any]:
        """Resolve `overflow=None` and check the durable-delivery rules at register.

        Raises:
            RegistryError: `resume_after` defined on a non-durable module.
            StorageError: a durable module on a storage without the `CursorStore` capability.
        """
        if spec.overflow is None:
            spec = dataclasses.replace(spec, overflow=resolved_overflow(spec))
        if type(instance).overrides("resume_after") and not spec.durable:
            raise RegistryError(
                f"module {module_id!r} defines resume_after but is not durable: resume_after "
                "is for durable modules only (register it with durable=True)",
                module_id=module_id,
            )
        if spec.durable and not type(instance).overrides("resume_after"):
            # A module that owns its position (resume_after) needs no cursor from storage.
            self._host.require_storage(CursorStore, f"register durable module {module_id!r}")
        return spec

    def dirty_cursors(self) -> dict[str, int]:
        """Runtime-kept cursors (durable modules without `resume_after`) that moved since
        they were last stored: module id -> position (highest seq processed, -1: none)."""
        if not self._durable:
            return {}
        return {
            c.id: c.next_seq - 1
            for c in self.order
            if c.durable
            and c.positioned
            and not c.owns_position
            and not c.removed
            and c.next_seq - 1 != c.saved_position
        }

    def cursors_saved(self, cursors: dict[str, int] | Any) -> None:
        """`cursors` were stored: remember them; re-arm the flusher once nothing is dirty."""
        for module_id, position in cursors.items():
            child = self.children.get(module_id)
            if child is not None:
                child.saved_position = position
        if self.cursor_dirty.is_set() and not self.dirty_cursors():
            self.cursor_dirty = trio.Event()

    def add_child(self, child: Child) -> None:
        self.children[child.id] = child
        self.order.append(child)
        if child.durable:
            self._durable = True

    def resolve_order(self) -> None:
        """Put the modules in start order (see `_order.start_order`).

        Raises:
            RegistryError: unknown dependency or a cycle (before anything runs).
        """
        self.order = start_order(self.order, self.children)

    # -- events from actors ----------------------------------------------------------------
    def initialized(self, child: Child) -> None:
        """The actor's `init` returned (startup): INITIALIZED before its next message."""
        enter(child, ModuleEvent.INIT_OK)

    def started(self, child: Child) -> None:
        """The actor's `start` returned: RUNNING before its next message is handled."""
        enter(child, ModuleEvent.START_OK)

    # -- startup ---------------------------------------------------------------------------
    async def _request(self, child: Child, op: LifecycleOp) -> None:
        msg = Lifecycle(op)
        child.mailbox.put_front(msg)
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
            for child in self.order:
                # The actor reports INITIALIZED (then RUNNING) itself, before it handles
                # anything else; setting it here after the reply could overwrite a later crash.
                first = child.launch(self._host._module_nursery, LifecycleOp.INIT)
                await first.reply.wait()
                self._check_startup()
        except BaseException as exc:
            await self._rollback(exc)
            raise
        self.fire(PhaseEvent.INIT_ALL_OK)

    async def start_all(self) -> None:
        """Run `start` in start order; roll back on failure."""
        try:
            self._check_startup()
            for child in self.order:
                await self._request(child, LifecycleOp.START)
                self._check_startup()
        except BaseException as exc:
            await self._rollback(exc)
            raise
        self.fire(PhaseEvent.START_ALL_OK)

    async def _rollback(self, exc: BaseException) -> None:
        """Stop every live module in reverse order after a startup failure (shielded)."""
        if isinstance(exc, ModuleError) and exc.module_id in self.children:
            failed = self.children[exc.module_id]
            enter(failed, ModuleEvent.STARTUP_FAILED)
            failed.last_error = repr(exc.__cause__ or exc)
        log.error("ledger %r: startup failed, rolling back: %s", self.ledger_id, exc)
        self.fire(PhaseEvent.STARTUP_FAILED)
        cap = self._host.config.exit_timeout if not isinstance(exc, Exception) else None
        with trio.CancelScope(shield=True):
            await self._stop_all_children(StopMode.DRAIN, cap=cap, reason="rolled back")

    # -- stopping --------------------------------------------------------------------------
    async def _stop_child(self, child: Child, mode: StopMode, *, cap: float | None) -> None:
        """Stop one live incarnation: `stop` (after draining, or at once, by `mode`), then
        cancel it if it overstays `shutdown` (`None` waits forever unless `cap` is given;
        0 cancels at once without `stop`)."""
        if not child.alive:
            return
        shutdown = child.spec.shutdown
        if shutdown is None:
            shutdown = cap
        if shutdown == 0:
            child.kill()
        else:
            msg = Lifecycle(LifecycleOp.STOP)
            if mode is StopMode.DRAIN:
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

    async def _stop_all_children(self, mode: StopMode, *, cap: float | None, reason: str) -> None:
        """Stop every module in reverse start order; each ends STOPPED (or FAILED)."""
        for child in reversed(self.order):
            if child.alive:
                if child.state not in (ModuleState.RESTARTING, ModuleState.FAILED):
                    enter(child, ModuleEvent.STOP)
                await self._stop_child(child, mode, cap=cap)
            if child.state is not ModuleState.REGISTERED:
                enter(child, ModuleEvent.STOPPED)
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
        for child in self.order:
            if child.state is not ModuleState.RESTARTING:
                continue
            if not child.alive:
                child.stop_result = StopResult.ABANDONED
                child.last_error = child.last_error or "restart abandoned: the ledger stopped"
                enter(child, ModuleEvent.ABANDONED)
                self._shut(child, "the ledger stopped before its restart")
            elif child.withdraw_queued_stop():
                enter(child, ModuleEvent.STOP_WITHDRAWN)
            # Otherwise it is booting (it becomes RUNNING or FAILED by itself) or already
            # stopping (it ends STOPPED).

    async def stop_all(self, *, cap: float | None) -> None:
        """Stop every module in reverse start order, each after draining its inbox.

        Cancellation: not handled here; the engine's stop aborts the rest (`abort`).
        """
        await self._stop_all_children(StopMode.DRAIN, cap=cap, reason="stopped")

    async def abort(self) -> None:
        """Cancel every module at once (no `stop`), in reverse order; settle and shut them."""
        with trio.CancelScope(shield=True):
            for child in reversed(self.order):
                child.kill()
                await child.wait_done()
                if child.state is not ModuleState.REGISTERED:
                    enter(child, ModuleEvent.STOPPED)
                self._shut(child, "stopped")

    def close(self) -> None:
        """The ledger is closed: every mailbox refuses requests (pending asks fail)."""
        for child in self.order:
            if not child.mailbox.is_shut:
                self._shut(child, "the ledger is closed")

    def longest_shutdown(self, cap: float | None) -> float | None:
        """The longest `shutdown` of any module (`None` ones count as `cap`; None = forever)."""
        limits = [cap if c.spec.shutdown is None else c.spec.shutdown for c in self.order]
        if None in limits:
            return None
        return max([limit for limit in limits if limit is not None], default=0.0)

    def kill_all(self) -> None:
        for child in self.order:
            child.kill()

    # -- crash handling --------------------------------------------------------------------
    def _will_restart(self, child: Child, crashed: bool) -> bool:
        restart = child.spec.restart
        return restart is Restart.PERMANENT or (restart is Restart.TRANSIENT and crashed)

    def crash_detected(self, child: Child) -> None:
        """A callback crashed and its caller is about to learn it: show the outcome in `state`
        now (RESTARTING or FAILED) rather than after the incarnation has unwound."""
        if self.phase is Phase.RUNNING and child.state is ModuleState.RUNNING and not child.removed:
            child.crashing = True
            restarting = self._will_restart(child, crashed=True)
            enter(child, ModuleEvent.CRASH_RESTART if restarting else ModuleEvent.CRASH_FAILED)

    def child_ended(
        self, child: Child, incarnation: int, outcome: Outcome, error: BaseException | None
    ) -> None:
        """Called by an actor when an incarnation ends (synchronously, in the actor task).

        Dispatches on the outcome; each handler records what happened and fires one event:
        * STOPPED / KILLED (asked to stop, or cancelled): `_ended_by_stop`.
        * BOOT_FAILED (init/start raised; the requester has the error and decides):
          `_boot_failed`.
        * CRASHED / EXITED: `_crashed_or_exited`, where phase and restart type decide.
        """
        was_running = child.state is ModuleState.RUNNING or child.crashing
        child.crashing = False
        if outcome is Outcome.STOPPED or outcome is Outcome.KILLED:
            self._ended_by_stop(child, killed=outcome is Outcome.KILLED, error=error)
        elif outcome is Outcome.BOOT_FAILED:
            assert error is not None
            self._boot_failed(child, error)
        else:
            self._crashed_or_exited(
                child,
                incarnation,
                error,
                crashed=outcome is Outcome.CRASHED,
                was_running=was_running,
            )

    def _ended_by_stop(self, child: Child, *, killed: bool, error: BaseException | None) -> None:
        """Record how it stopped; a member of a group restart waits for the round, anything
        else ends STOPPED (FAILED if `stop` raised)."""
        if killed:
            child.stop_result = StopResult.CANCELLED
        else:
            child.stop_result = StopResult.ERROR if error is not None else StopResult.CLEAN
        if error is not None:
            child.last_error = repr(error)
            log.warning("module %r: stop raised %r", child.id, error)
        if child.state is ModuleState.RESTARTING:
            return  # stopped by a group restart: the round starts it again (even while the
            # ledger stops, the round completes; if abandoned, abandon_restarts settles it)
        if error is not None:
            enter(child, ModuleEvent.STOP_FAILED)
        elif child.state is not ModuleState.REGISTERED:
            enter(child, ModuleEvent.STOPPED)
        self._shut(child, "stopped")

    def _boot_failed(self, child: Child, error: BaseException) -> None:
        """Its requester decides (rollback, a new round, `restart` raising), except while the
        ledger stops: then nobody will, so FAILED."""
        child.last_error = repr(error)
        child.crashes += 1
        self.crashes += 1
        if self.phase in (Phase.STOPPING, Phase.STOPPED, Phase.FAILED):
            enter(child, ModuleEvent.BOOT_FAILED)
            self._shut(child, "failed to start while the ledger stopped")

    def _crashed_or_exited(
        self,
        child: Child,
        incarnation: int,
        error: BaseException | None,
        *,
        crashed: bool,
        was_running: bool,
    ) -> None:
        """During startup the startup fails; while RUNNING the restart type decides
        (RESTARTING and a report to the supervisor task, or FAILED / STOPPED); otherwise
        (stopping, or already part of a group restart) it is not restarted from here."""
        if crashed:
            assert error is not None
            child.crashes += 1
            self.crashes += 1
            child.last_error = repr(error)
            log.error(
                "module %r crashed (incarnation %d): %r",
                child.id,
                incarnation,
                error,
                exc_info=(type(error), error, error.__traceback__),
            )
        else:
            child.stop_result = StopResult.EXITED
            log.info("module %r exited (incarnation %d)", child.id, incarnation)
        ended = ModuleEvent.CRASH_FAILED if crashed else ModuleEvent.EXIT_STOPPED
        what = "crashed" if crashed else "exited"
        phase = self.phase
        if phase in (Phase.CREATED, Phase.INITIALIZED):
            if crashed and self._startup_failure is None:
                assert error is not None
                self._startup_failure = (child, error)
        elif phase is Phase.RUNNING and was_running:
            if self._will_restart(child, crashed=crashed):
                enter(child, ModuleEvent.CRASH_RESTART)
                self._reports_send.send_nowait((child, incarnation, error))
                return
            what = f"{child.spec.restart.name} module {what}"
        elif phase is Phase.RUNNING and child.state is ModuleState.RESTARTING:
            return  # part of a group restart in progress: the round starts it again
        enter(child, ended)
        self._shut(child, what)

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
                if self.phase is not Phase.RUNNING:
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
        """The modules a restart of `crashed` affects, in start order.

        As OTP: ONE_FOR_ONE is the crashed module alone; ONE_FOR_ALL every module,
        REST_FOR_ONE the crashed one and every module after it, of which every non-TEMPORARY
        member is started again, whatever its state (one that exited normally or was
        terminated too), while a TEMPORARY member takes part only if it runs (it is stopped
        and never started again).
        """
        strategy = self._host.config.strategy
        if strategy is Strategy.ONE_FOR_ONE:
            return [crashed]
        order = self.order
        start = 0 if strategy is Strategy.ONE_FOR_ALL else order.index(crashed)
        return [
            c
            for c in order[start:]
            if c is crashed
            or c.spec.restart is not Restart.TEMPORARY
            or c.state in (ModuleState.RUNNING, ModuleState.RESTARTING)
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
            if self.phase is not Phase.RUNNING:
                return
            if not self._intensity.admit(trio.current_time()):
                await self._escalate(crashed, cause)
                return
            group = self._group(crashed)
            for child in reversed(group):
                if child.state is not ModuleState.RESTARTING:
                    running = child.state is ModuleState.RUNNING
                    enter(child, ModuleEvent.GROUP_RESTART)
                    if not running:  # exited, terminated or failed: it only has to unwind
                        await child.wait_done()
                        continue
                await self._stop_child(child, StopMode.NOW, cap=None)
            restartable = []
            for child in group:
                if child is not crashed and child.spec.restart is Restart.TEMPORARY:
                    enter(child, ModuleEvent.TEMPORARY_LEFT)  # OTP: never restarted
                    self._shut(child, "TEMPORARY module stopped by a group restart")
                else:
                    restartable.append(child)
            delay = self._backoff_delay(crashed)
            if delay > 0 and self.phase is Phase.RUNNING:
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
            enter(crashed, ModuleEvent.RESTART_FAILED)

    async def _boot(self, child: Child) -> BaseException | None:
        """Start a new incarnation (fresh instance from a factory) with init + start."""
        child.restarts += 1
        self.restarts += 1
        try:
            child.renew_instance()
        except Exception as exc:
            child.crashes += 1
            self.crashes += 1
            child.last_error = repr(exc)
            log.error("module %r: factory failed on restart: %r", child.id, exc)
            return exc
        first = child.launch(self._host._module_nursery, LifecycleOp.BOOT)
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
        self.fire(PhaseEvent.ESCALATED)
        enter(child, ModuleEvent.ESCALATED)
        with trio.CancelScope(shield=True):
            await self._stop_all_children(
                StopMode.NOW, cap=config.exit_timeout, reason="ledger failed"
            )
        self._host._escalated(failure)

    # -- dynamic control -------------------------------------------------------------------
    def _require_running(self, what: str) -> None:
        phase = self.phase
        if phase is not Phase.RUNNING:
            raise LifecycleError(
                f"cannot {what}: ledger {self.ledger_id!r} is {phase.name} ({what} needs RUNNING)",
                phase=phase,
            )

    def _lookup(self, module_id: str) -> Child:
        child = self.children.get(module_id)
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
            if child.id in self.children:
                raise RegistryError(f"module {child.id!r} is already present", module_id=child.id)
            for dep in child.spec.depends_on:
                if dep not in self.children:
                    raise RegistryError(
                        f"module {child.id!r} depends on unknown module {dep!r}",
                        module_id=child.id,
                    )
            self.add_child(child)
            try:
                first = child.launch(self._host._module_nursery, LifecycleOp.BOOT)
                await first.reply.wait()
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._stop_child(child, StopMode.NOW, cap=0)
                self.children.pop(child.id, None)
                self.order.remove(child)
                child.removed = True
                enter(child, ModuleEvent.STARTUP_FAILED)
                self._shut(child, "add failed")
                raise

    async def terminate(self, module_id: str) -> None:
        """Stop a module (drain, `stop`), keeping its spec; no-op if already stopped/failed."""
        self._require_running("terminate a module")
        child = self._lookup(module_id)
        async with self._lock:
            if child.removed or child.state in (ModuleState.STOPPED, ModuleState.FAILED):
                return
            enter(child, ModuleEvent.STOP)
            await self._stop_child(child, StopMode.DRAIN, cap=None)
            enter(child, ModuleEvent.STOPPED)
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
                enter(child, ModuleEvent.BOOT_FAILED)
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
            del self.children[module_id]
            self.order.remove(child)
            self._shut(child, "removed")
