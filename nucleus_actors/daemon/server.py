"""`Daemon`: the ledgers of a configuration, each in its own task, behind the HTTP API.

```
run() ── nursery ─┬─ signal watcher        (SIGTERM/SIGINT: graceful, 2nd: force; SIGHUP: reload)
                  ├─ ledger task per ledger (async with engine: init_all, start_all, wait, stop_all)
                  └─ hypercorn.trio.serve   (FastAPI app; shutdown_trigger = stop requested)
```

Startup: every ledger starts first (a ledger that fails to start is handled per
`on_ledger_failure`), then the server binds and logs `listening on http://HOST:PORT`.

SIGHUP reloads what can change safely (`Daemon.reload`: log level, token files, the
`config` of modules with a `reconfigure(config)` method) and logs what it could not.

Shutdown (a signal, or a ledger failure with `on_ledger_failure = "exit"`): streams end, the
server stops accepting and lets in-flight requests finish (`graceful_timeout`), then every
ledger runs `stop_all` (each module's `stop`, in reverse start order) and closes its storage.
The exit status is 0 after a signal, 1 after a ledger failure.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig

from ..engine import LedgerEngine
from ..errors import IntegrityError, NucleusError, ProofError, RegistryError
from ..storage import MemoryStorage, SQLiteStorage, StorageBackend
from .access import AccessLog
from .app import create_app
from .checkpoints import CheckpointSigner, default_origin, load_signer_key
from .config import ConfigError, ConfigProblem, DaemonConfig, LedgerSettings, resolve_use
from .connections import HttpServer
from .events import watch_lifecycle
from .guards import HostAllowList
from .host import DaemonState, LedgerHost
from .metrics import DaemonMetrics
from .preflight import preflight

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "Daemon", "build_hosts"]

log = logging.getLogger("nucleus_actors.daemon")

EXIT_OK: Final = 0
"""Stopped by a signal after a clean shutdown."""
EXIT_FAILURE: Final = 1
"""A ledger failed (with `on_ledger_failure = "exit"`) or the server could not listen."""
EXIT_CONFIG: Final = 2
"""The configuration is unusable (nothing was started, or startup found a config problem)."""


def _signer(
    config: DaemonConfig, settings: LedgerSettings, engine: LedgerEngine, accept_rollback: bool
) -> CheckpointSigner | None:
    """The ledger's checkpoint signer, or None without `checkpoint_key`.

    Raises:
        ValueError: the key file cannot be read, is not private, or is named otherwise than
            the origin.
    """
    path = settings.checkpoint_key_path(config.base_dir)
    if path is None:
        return None
    try:
        key = load_signer_key(path)
    except (OSError, ProofError) as exc:
        raise ValueError(f"cannot use the signer key file {path}: {exc}") from None
    origin = settings.checkpoint_origin or default_origin(settings.id)
    if key.name != origin:
        raise ValueError(
            f"the signer key in {path} is named {key.name!r}, the checkpoint origin is "
            f"{origin!r}: they must match (`nucleus keygen {origin}`, or set checkpoint_origin)"
        )
    return CheckpointSigner(
        engine,
        key,
        path,
        origin=origin,
        interval=settings.checkpoint_interval,
        accept_rollback=accept_rollback,
    )


def build_hosts(
    config: DaemonConfig,
    *,
    metrics: DaemonMetrics | None = None,
    accept_rollback: bool = False,
) -> dict[str, LedgerHost]:
    """Create every ledger's storage and engine and register its modules (nothing runs yet).

    Args:
        config: the validated configuration.
        metrics: when given, every module instance gets its hooks timed into it.
        accept_rollback: let checkpoint signers start on a ledger rolled back behind the last
            checkpoint they signed (`nucleus run --accept-rollback`).

    Raises:
        ConfigError: a module cannot be registered (its factory fails, duplicate id, bad
            option), listing every such problem with its path.
    """
    hosts: dict[str, LedgerHost] = {}
    problems: list[ConfigProblem] = []
    for index, settings in enumerate(config.ledgers):
        path = settings.storage_path(config.base_dir)
        factory = _engine_factory(config, settings, metrics, index, problems)
        if factory is None:
            continue
        engine = factory(False)
        hosts[settings.id] = LedgerHost(settings, engine, path)
        if settings.postgres:
            hosts[settings.id].factory = factory
        try:
            hosts[settings.id].signer = _signer(config, settings, engine, accept_rollback)
        except ValueError as exc:
            problems.append(ConfigProblem(f"ledgers[{index}].checkpoint_key", str(exc)))
    problems += preflight(config, hosts)  # what `check` and `run` both refuse (exit 2)
    if problems:
        raise ConfigError("configuration", problems)
    return hosts


def _engine_factory(
    config: DaemonConfig,
    settings: LedgerSettings,
    metrics: DaemonMetrics | None,
    index: int,
    problems: list[ConfigProblem],
) -> Callable[[bool], LedgerEngine] | None:
    """`factory(standby)` making the ledger's engine on a new storage object (a standby's has
    no modules), or None after adding the problem (a bad `dsn_file`)."""
    path = settings.storage_path(config.base_dir)
    dsn: str | None = None
    if settings.postgres:
        try:
            dsn = settings.dsn(config.base_dir)
        except ValueError as exc:
            problems.append(ConfigProblem(f"ledgers[{index}].dsn_file", str(exc)))
            return None
    instrument = None if metrics is None else metrics.instrument(settings.id)
    first = True

    def factory(standby: bool) -> LedgerEngine:
        nonlocal first
        storage: StorageBackend
        if settings.postgres:
            from ..storage.postgres import PostgresStorage

            storage = PostgresStorage(
                dsn,
                schema=settings.pg_schema,
                lease_timeout=settings.lease_timeout,
                standby=standby,
            )
        elif path is None:
            storage = MemoryStorage()
        else:
            storage = SQLiteStorage(path, durability=settings.durability)
        engine = LedgerEngine(settings.ledger_config(), storage)
        if standby:
            return engine
        report = first
        first = False
        for position, module in enumerate(settings.modules):
            try:
                engine.register(module.spec(instrument=instrument))
            except (NucleusError, ValueError, TypeError) as exc:
                if not report:
                    raise
                where = f"ledgers[{index}].modules[{position}] (ledger {settings.id!r}, "
                where += f"module {module.use!r})"
                problems.append(ConfigProblem(where, f"cannot register the module: {exc}"))
        return engine

    return factory


def _ledger_ended(host: LedgerHost, task_status: trio.TaskStatus[None], *, started: bool) -> None:
    """A ledger's task is ending (stopped, failed or cancelled): it no longer serves, waiters
    are woken, and a startup not reported yet is reported now (the daemon goes on)."""
    host.serving = False
    host.notify()
    if not started:
        task_status.started()


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class Daemon:
    """A running configuration: its ledgers and the HTTP server in front of them.

    Args:
        config: the validated configuration.
        host: overrides `config.host` (the `--host` option).
        port: overrides `config.port` (`0` picks a free port).
        environ: where the token variable is read (default `os.environ`).
        force_exit: called with an exit status on a second signal (default `os._exit`).
        accept_rollback: start checkpoint signers even on a ledger rolled back behind the
            last checkpoint they signed (`nucleus run --accept-rollback`).

    Raises:
        ConfigError: a module cannot be registered (see `build_hosts`).
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        host: str | None = None,
        port: int | None = None,
        environ: Mapping[str, str] | None = None,
        force_exit: Callable[[int], object] = os._exit,
        config_path: str | os.PathLike[str] | None = None,
        log_level_fixed: bool = False,
        access_log: bool | None = None,
        accept_rollback: bool = False,
    ) -> None:
        self.config = config
        self.host = config.host if host is None else host
        self.port = config.port if port is None else port
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self.config_path = None if config_path is None else Path(config_path)
        """The file SIGHUP reloads (None: only the token files are re-read)."""
        self._log_level_fixed = log_level_fixed  # --log-level / $NUCLEUS_LOG_LEVEL win
        self.access_log = config.access_log if access_log is None else access_log
        token, read_token = self._tokens(config)
        if config.reads == "token" and token is None and read_token is None:
            raise ConfigError(
                "configuration",
                [ConfigProblem("reads", 'reads = "token" needs a read token or an API token')],
            )
        self.metrics = DaemonMetrics()
        """This daemon's metrics (its own registry), served at `/metrics`."""
        self.state = DaemonState(
            build_hosts(config, metrics=self.metrics, accept_rollback=accept_rollback),
            token=token,
            max_body_bytes=config.max_body_bytes,
            metrics=self.metrics,
            limits=config.http_limits(),
            reads=config.reads,
            read_token=read_token,
        )
        self.urls: list[str] = []
        """Where the server listens once bound (`http://HOST:PORT`)."""
        self._force_exit = force_exit
        self._stop = trio.Event()
        self._release = trio.Event()  # set once the server stopped: ledgers may stop now
        self._exit_code = EXIT_OK
        self._signals = 0
        self._pending_modules: list[tuple[LedgerHost, str, dict[str, Any]]] = []

    # -- tokens and reloading -------------------------------------------------------------
    def _tokens(self, config: DaemonConfig) -> tuple[str | None, str | None]:
        """(API token, read token): from their files if configured, else their variables.

        Raises:
            ConfigError: a token file cannot be read or is empty.
        """
        env = self._environ

        def from_file(key: str, value: str) -> str:
            path = config.path_of(value)
            try:
                text = path.read_text(encoding="utf-8").strip().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    "configuration", [ConfigProblem(key, f"cannot read {path}: {exc}")]
                ) from None
            if not text or not text[0].strip():
                raise ConfigError("configuration", [ConfigProblem(key, f"{path} is empty")])
            return text[0].strip()

        token = (
            from_file("token_file", config.token_file)
            if config.token_file
            else env.get(config.token_env) or None
        )
        read = (
            from_file("read_token_file", config.read_token_file)
            if config.read_token_file
            else env.get(config.read_token_env) or None
        )
        return token, read

    def reload(self) -> None:
        """Apply what can change safely (SIGHUP): the log level, the tokens (files), and the
        `config` of modules that accept it (`reconfigure`, run by `_reconfigure`). Logs what
        it could not apply; never stops the daemon."""
        from .logs import set_level

        log.info("SIGHUP: reloading %s", self.config_path or "the token files")
        new = self.config
        if self.config_path is not None:
            from .config import load_config

            try:
                new = load_config(self.config_path)
            except ConfigError as exc:
                log.error("SIGHUP: the configuration does not load; nothing reloaded: %s", exc)
                return
        try:
            token, read_token = self._tokens(new)
        except ConfigError as exc:
            log.error("SIGHUP: tokens not reloaded: %s", exc)
        else:
            if new.reads == "token" and token is None and read_token is None:
                log.error('SIGHUP: tokens not reloaded: reads = "token" needs a token')
            else:
                changed = (token, read_token) != (self.state.token, self.state.read_token)
                self.state.token, self.state.read_token = token, read_token
                self.state.reads = new.reads
                log.info("SIGHUP: tokens %s", "replaced" if changed else "unchanged")
        if not self._log_level_fixed and new.log_level != self.config.log_level:
            set_level(new.log_level.upper())
            log.info("SIGHUP: log level is now %s", new.log_level)
        not_reloaded = [
            key
            for key in ("host", "port", "max_body_bytes", "on_ledger_failure", "graceful_timeout",
                        "tls_cert", "tls_key", "log_format", "access_log", "token_env",
                        "read_token_env")
            if getattr(new, key) != getattr(self.config, key)
        ]  # fmt: skip
        if not_reloaded:
            log.warning(
                "SIGHUP: changed but not reloadable (restart the daemon to apply): %s",
                ", ".join(not_reloaded),
            )
        self._pending_modules = self._module_changes(new)
        self.config = new

    def _module_changes(self, new: DaemonConfig) -> list[tuple[LedgerHost, str, dict[str, Any]]]:
        """(host, module id, new config) of every module whose `config` changed; logs every
        other ledger or module change as needing a restart."""
        changes = []
        old = {ledger.id: ledger for ledger in self.config.ledgers}
        if [ledger.id for ledger in new.ledgers] != list(old):
            log.warning("SIGHUP: ledgers added or removed: restart the daemon to apply")
        for settings in new.ledgers:
            before = old.get(settings.id)
            host = self.state.hosts.get(settings.id)
            if before is None or host is None:
                continue
            plain = settings.model_dump(exclude={"modules"})
            if plain != before.model_dump(exclude={"modules"}):
                log.warning(
                    "SIGHUP: ledger %r settings changed: restart the daemon to apply", settings.id
                )
            if [(m.use, m.id) for m in settings.modules] != [(m.use, m.id) for m in before.modules]:
                log.warning(
                    "SIGHUP: ledger %r modules added, removed or reordered: restart the daemon "
                    "to apply",
                    settings.id,
                )
                continue
            for module, was in zip(settings.modules, before.modules, strict=True):
                if module.model_dump(exclude={"config"}) != was.model_dump(exclude={"config"}):
                    log.warning(
                        "SIGHUP: ledger %r module %r options changed: restart the daemon to apply",
                        settings.id,
                        module.id or module.use,
                    )
                if module.config != was.config:
                    module_id = module.id or str(getattr(resolve_use(module.use), "id", ""))
                    changes.append((host, module_id, dict(module.config)))
        return changes

    async def _reconfigure(self) -> None:
        """Hand changed module configs to modules with a `reconfigure(config)` method (run
        inside the actor, like `ask`); log the others."""
        pending, self._pending_modules = self._pending_modules, []
        for host, module_id, config in pending:
            try:
                handle = host.engine.modules.get(module_id)
            except NucleusError as exc:
                log.warning("SIGHUP: module %r of %r not reconfigured: %s", module_id, host.id, exc)
                continue
            try:
                done = await handle.ask(partial(_call_reconfigure, config=config))
            except Exception as exc:
                log.error(
                    "SIGHUP: module %r of ledger %r refused its new config: %s: %s",
                    module_id,
                    host.id,
                    type(exc).__name__,
                    exc,
                )
                continue
            if done:
                log.info("SIGHUP: module %r of ledger %r reconfigured", module_id, host.id)
            else:
                log.warning(
                    "SIGHUP: module %r of ledger %r has no reconfigure(config): its new config "
                    "applies after a restart of the daemon",
                    module_id,
                    host.id,
                )

    # -- stopping --------------------------------------------------------------------------
    def request_stop(self, exit_code: int = EXIT_OK) -> None:
        """Begin the graceful shutdown (idempotent; the first non-zero exit code wins)."""
        if exit_code and not self._exit_code:
            self._exit_code = exit_code
        if not self._stop.is_set():
            self.state.begin_stopping()
            self._stop.set()

    async def _watch_signals(self, receiver: AsyncIterator[int]) -> None:
        async for signum in receiver:
            if signum == signal.SIGHUP:
                try:
                    self.reload()
                    await self._reconfigure()
                except Exception:  # a reload never stops the daemon
                    log.exception("SIGHUP: reload failed")
                continue
            self._signals += 1
            name = signal.Signals(signum).name
            if self._signals == 1:
                log.info("%s received: shutting down (send it again to force exit)", name)
                self.request_stop(EXIT_OK)
            else:
                log.error("%s received again: forcing exit, modules are not stopped", name)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                sys.stderr.flush()
                self._force_exit(128 + signum)
                return

    # -- ledgers ---------------------------------------------------------------------------
    async def _run_ledger(
        self, host: LedgerHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run one ledger from `init_all` to `stop_all`; report startup through task_status."""
        engine = host.engine
        started = False
        try:
            async with engine:
                if host.settings.verify_on_open == "full":
                    await self._verify(host)  # IntegrityError: the ledger does not start
                if host.signer is not None:
                    await host.signer.check()  # never sign backwards (a restored backup?)
                await engine.init_all()
                await engine.start_all()
                host.serving = True
                started = True
                s = engine.state
                log.info(
                    "ledger %r running: %d entries, head %s, storage %s, modules: %s",
                    host.id,
                    s.length,
                    s.head.hex(),
                    "memory" if host.storage_path is None else host.storage_path,
                    ", ".join(h.id for h in engine.modules) or "none",
                )
                task_status.started()
                async with trio.open_nursery() as background:
                    if host.signer is not None:
                        background.start_soon(host.signer.run)
                    if host.settings.verify_on_open == "tail":
                        background.start_soon(self._verify_in_background, host)
                    await self._release.wait()
                    background.cancel_scope.cancel()
                host.serving = False
                await engine.stop_all()
            log.info("ledger %r stopped: %d entries", host.id, engine.state.length)
        except Exception as exc:  # LedgerFailed, a startup ModuleError, StorageError, ...
            self._ledger_failed(host, exc, started=started)
        finally:
            _ledger_ended(host, task_status, started=started)

    # -- PostgreSQL ledgers: writer, standby, failover --------------------------------------
    async def _run_pg_ledger(
        self, host: LedgerHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run a PostgreSQL ledger until the daemon stops: as the writer while this daemon
        holds the lease, else as a standby (reads served, writes refused, head following the
        database) that takes over once the lease expires (`role = "auto"` / `"writer"`).

        A writer that is fenced (another daemon took a newer epoch) stops its modules and
        becomes a standby. Startup reports once the ledger serves in either role.
        """
        settings = host.settings
        assert host.factory is not None
        started = False

        def serving() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        engine: LedgerEngine | None = host.engine  # the first writer candidate
        try:
            while not self._release.is_set():
                if settings.role != "standby":
                    if engine is None:
                        engine = host.factory(False)
                    outcome = await self._pg_writer(host, engine, serving, first=not started)
                    engine = None
                    if outcome == "released":
                        return
                if not await self._pg_standby(host, serving):
                    return
        except Exception as exc:
            self._ledger_failed(host, exc, started=started)
        finally:
            _ledger_ended(host, task_status, started=started)

    async def _pg_writer(
        self, host: LedgerHost, engine: LedgerEngine, serving: Callable[[], None], *, first: bool
    ) -> str:
        """Try to write the ledger: `"released"` (the daemon stops), `"busy"` (another writer
        holds the lease), `"fenced"` (this writer was replaced), `"failed"` (storage failed
        while taking over: wait as a standby)."""
        from ..errors import Fenced, LedgerFailed, StorageError

        storage = engine.storage
        was_standby = host.role == "standby"
        try:
            async with engine:
                epoch = getattr(storage, "epoch", None)
                if host.settings.verify_on_open == "full":
                    await self._verify(host)
                await engine.init_all()
                await engine.start_all()
                host.engine = engine
                host.role, host.epoch = "writer", epoch
                host.failure = None
                if was_standby:
                    host.takeovers += 1
                try:
                    host.signer = _signer(self.config, host.settings, engine, False)
                except ValueError as exc:
                    log.error("ledger %r: checkpoints not signed: %s", host.id, exc)
                    host.signer = None
                if host.signer is not None:
                    await host.signer.check()
                host.serving = True
                host.notify()
                s = engine.state
                log.info(
                    "ledger %r: writer at epoch %s%s: %d entries, head %s, modules: %s",
                    host.id, epoch, " (took over)" if was_standby else "", s.length,
                    s.head.hex(), ", ".join(h.id for h in engine.modules) or "none",
                )  # fmt: skip
                serving()
                async with trio.open_nursery() as background:
                    if host.signer is not None:
                        background.start_soon(host.signer.run)
                    if host.settings.verify_on_open == "tail":
                        background.start_soon(self._verify_in_background, host)
                    wait_lost = getattr(storage, "wait_lost", None)
                    if wait_lost is not None:

                        async def watch() -> None:
                            engine.fence(await wait_lost())

                        background.start_soon(watch)
                    await self._release.wait()
                    background.cancel_scope.cancel()
                host.serving = False
                await engine.stop_all()
            log.info("ledger %r stopped: %d entries", host.id, engine.state.length)
            return "released"
        except Fenced as exc:  # at open: the lease is held by another writer
            log.info("ledger %r: %s", host.id, exc)
            return "busy"
        except LedgerFailed as exc:
            if not isinstance(exc.__cause__, Fenced):
                raise
            host.fenced += 1
            log.error(
                "ledger %r: this daemon was fenced at epoch %s (another daemon writes it at "
                "epoch %s): becoming a standby",
                host.id, exc.__cause__.epoch, exc.__cause__.current,
            )  # fmt: skip
            return "fenced"
        except StorageError as exc:
            if first:
                raise
            log.warning("ledger %r: could not take over: %s", host.id, exc)
            await trio.sleep(min(1.0, host.settings.lease_timeout / 3))
            return "failed"
        finally:
            host.serving = False
            host.signer = None
            host.notify()

    async def _pg_standby(self, host: LedgerHost, serving: Callable[[], None]) -> bool:
        """Serve the ledger as a standby until the lease expires (True: try to take over; a
        `role = "standby"` never does) or the daemon stops (False)."""
        from ..errors import NucleusError as _Nucleus

        assert host.factory is not None
        settings = host.settings
        poll = min(0.25, settings.lease_timeout / 4)
        while not self._release.is_set():
            engine = host.factory(True)
            storage: Any = engine.storage
            try:
                async with engine:
                    await engine.init_all()
                    await engine.start_all()
                    host.engine = engine
                    host.role = "standby"
                    host.epoch = (await storage.lease()).epoch
                    host.failure = None
                    host.serving = True
                    host.notify()
                    log.info(
                        "ledger %r: standby (epoch %s held by another daemon): %d entries",
                        host.id, host.epoch, engine.state.length,
                    )  # fmt: skip
                    serving()
                    takeover = False
                    warned = False
                    while not self._release.is_set():
                        with trio.move_on_after(poll):
                            await self._release.wait()
                        if self._release.is_set():
                            break
                        try:
                            await engine.refresh()
                            lease = await storage.lease()
                        except _Nucleus as exc:
                            if not warned:
                                log.warning("ledger %r: standby cannot follow: %s", host.id, exc)
                            warned = True
                            continue
                        if warned:
                            log.info("ledger %r: standby follows the database again", host.id)
                        warned = False
                        host.epoch = lease.epoch
                        if settings.role != "standby" and lease.remaining <= 0:
                            log.info(
                                "ledger %r: the lease of epoch %d expired: taking over",
                                host.id, lease.epoch,
                            )  # fmt: skip
                            takeover = True
                            break
                    host.serving = False
                    host.notify()
                    await engine.stop_all()
                return takeover
            except _Nucleus as exc:
                host.serving = False
                host.failure = exc
                host.notify()
                log.warning("ledger %r: standby failed, retrying: %s", host.id, exc)
                with trio.move_on_after(min(1.0, settings.lease_timeout / 2)):
                    await self._release.wait()
        return False

    async def _verify(self, host: LedgerHost) -> None:
        """Verify the whole chain of `host`'s ledger (as it is now); record the outcome."""
        length = host.engine.state.length
        try:
            await host.engine.verify()
        except IntegrityError:
            host.verify_failed = True
            raise
        host.verify_failed = False
        host.verified_entries = length
        log.info("ledger %r: the whole chain verifies (%d entries)", host.id, length)

    async def _verify_in_background(self, host: LedgerHost) -> None:
        """`verify_on_open = "tail"`: verify the whole chain once, while the ledger serves; a
        bad entry is logged (and shown by `nucleus_ledger_verify_failed`)."""
        try:
            await self._verify(host)
        except IntegrityError as exc:
            log.error("ledger %r: background verification failed: %s", host.id, exc)
        except NucleusError as exc:  # the ledger went down meanwhile
            log.warning("ledger %r: background verification stopped: %s", host.id, exc)

    def _ledger_failed(self, host: LedgerHost, exc: Exception, *, started: bool) -> None:
        """A ledger's task ended with `exc`: record it on `host` (it stops serving), log it, and
        stop the daemon if `on_ledger_failure` says so (always for a configuration error at
        startup)."""
        host.serving = False
        host.failure = exc
        when = "failed" if started else "failed to start"
        cause = exc.__cause__
        because = f" (cause: {type(cause).__name__}: {cause})" if cause is not None else ""
        if isinstance(exc, RegistryError) and not started:
            log.error("ledger %r: configuration error: %s", host.id, exc)
            self.request_stop(EXIT_CONFIG)
            return
        if isinstance(exc, NucleusError):
            log.error("ledger %r %s: %s: %s%s", host.id, when, type(exc).__name__, exc, because)
        else:
            log.error("ledger %r %s", host.id, when, exc_info=exc)
        if self.config.on_ledger_failure == "exit":
            log.error("on_ledger_failure = 'exit': stopping the daemon")
            self.request_stop(EXIT_FAILURE)
        else:
            log.warning("on_ledger_failure = 'serve': ledger %r answers 503", host.id)

    # -- server ----------------------------------------------------------------------------
    def _hypercorn_config(self) -> HypercornConfig:
        config = HypercornConfig()
        config.bind = [_bind(self.host, self.port)]
        config.graceful_timeout = self.config.graceful_timeout
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            config.certfile = str(self.config.path_of(self.config.tls_cert))
            config.keyfile = str(self.config.path_of(self.config.tls_key))
        config.accesslog = None
        http_log = logging.getLogger("nucleus_actors.daemon.http")
        config.errorlog = http_log
        return config

    async def _serve(self) -> None:
        """Serve HTTP until stop is requested and in-flight requests finished."""
        app = AccessLog(create_app(self.state), enabled=self.access_log)
        config = self._hypercorn_config()
        try:
            async with trio.open_nursery() as nursery:
                trigger = self._stop.wait
                server = HttpServer(app, config, self.state.limits)
                urls: list[str] = await nursery.start(server.serve, trigger)
                self.urls = urls
                self._allow_hosts(urls, server)
                for url in urls:
                    log.info("listening on %s", url)
                self._log_access_policy()
                _freeze_heap()
        except BaseExceptionGroup as group:
            bind_errors, rest = group.split(OSError)
            if rest is not None or bind_errors is None:
                raise
            log.error("cannot listen on %s: %s", config.bind[0], _first(bind_errors))
            self.request_stop(EXIT_FAILURE)
            return
        log.info("HTTP server stopped")

    def _allow_hosts(self, urls: list[str], server: HttpServer) -> None:
        """Fill in the default `allowed_hosts` now that the port is known; log the limits."""
        if self.state.allowed_hosts is None and urls:
            port = int(urls[0].rsplit(":", 1)[1])
            self.state.allowed_hosts = HostAllowList.defaults(self.host, port)
            if self.host in ("0.0.0.0", "::", ""):
                log.warning(
                    "listening on every interface with the default allowed_hosts (loopback "
                    "names only): list the names clients use in allowed_hosts"
                )
        limits = self.state.limits
        allowed = self.state.allowed_hosts
        log.info(
            "limits: max_connections %d, read_timeout %gs, max_body_bytes %d, "
            "max_batch_records %d, allowed hosts: %s",
            server.max_connections,
            limits.read_timeout,
            self.state.max_body_bytes,
            limits.max_batch_records,
            "any" if allowed is None else ", ".join(allowed.entries),
        )

    def _log_access_policy(self) -> None:
        env = self.config.token_env
        if self.config.reads == "token":
            log.info('reads need a bearer token (reads = "token")')
        if self.state.token is not None:
            source = self.config.token_file or f"${env}"
            log.info("writes need a bearer token (from %s)", source)
        elif self.host in ("127.0.0.1", "::1", "localhost"):
            log.info("writes are open to local clients ($%s is not set)", env)
        else:
            log.warning(
                "writes are open to anyone who can reach %s: set $%s to require a token",
                self.host,
                env,
            )

    async def run(self) -> int:
        """Serve until a signal or a ledger failure; return the exit status.

        Every ledger starts first, then the server binds and logs `listening on URL`.
        SIGTERM/SIGINT start the graceful shutdown; a second one calls `force_exit`. Must run
        in trio's main thread (signal handling).

        Cancellation: ledgers are stopped as their engines' `__aexit__` describes (shielded,
        bounded), then the cancellation propagates.
        """
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*signals) as receiver:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals, receiver)
                await self._run_all()
                nursery.cancel_scope.cancel()
        log.info("daemon stopped (exit status %d)", self._exit_code)
        return self._exit_code

    async def _run_all(self) -> None:
        # Ledgers stop only after the server stopped: in-flight requests still need them.
        async with trio.open_nursery() as ledgers:
            for host in self.state.hosts.values():
                if host.factory is not None:
                    await ledgers.start(self._run_pg_ledger, host)
                else:
                    await ledgers.start(self._run_ledger, host)
            ledgers.start_soon(watch_lifecycle, self.state)  # GET .../events (events.py)
            if not self._stop.is_set():
                await self._serve()
            await self._stop.wait()
            self._release.set()


def _freeze_heap() -> None:
    """Move everything alive once the daemon serves (the app, its routes and schemas, modules,
    ledgers' state) out of the cyclic garbage collector's reach (`gc.freeze`).

    A full collection otherwise walks those ~100k objects each time requests with many objects
    (a batch of 1,000 records) trigger one: 50-150 ms during which no request is served. They
    live as long as the daemon, so nothing is lost by never collecting them.
    """
    gc.collect()
    gc.freeze()


async def _call_reconfigure(module: Any, *, config: dict[str, Any]) -> bool:
    """Inside the actor: `module.reconfigure(config)` (sync or async); False if it has none."""
    method = getattr(module, "reconfigure", None)
    if not callable(method):
        return False
    result = method(config)
    if inspect.isawaitable(result):
        await result
    return True


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
