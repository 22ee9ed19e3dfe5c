"""`Daemon`: the ledgers of a configuration, each in its own task, behind the HTTP API.

```
run() ── nursery ─┬─ signal watcher        (1st SIGTERM/SIGINT: graceful; 2nd: force exit)
                  ├─ ledger task per ledger (async with engine: init_all, start_all, wait, stop_all)
                  └─ hypercorn.trio.serve   (FastAPI app; shutdown_trigger = stop requested)
```

Startup: every ledger starts first (a ledger that fails to start is handled per
`on_ledger_failure`), then the server binds and logs `listening on http://HOST:PORT`.

Shutdown (a signal, or a ledger failure with `on_ledger_failure = "exit"`): streams end, the
server stops accepting and lets in-flight requests finish (`graceful_timeout`), then every
ledger runs `stop_all` (each module's `stop`, in reverse start order) and closes its storage.
The exit status is 0 after a signal, 1 after a ledger failure.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from typing import Final

import trio
from hypercorn.config import Config as HypercornConfig

from ..engine import LedgerEngine
from ..errors import IntegrityError, NucleusError, ProofError, RegistryError
from ..storage import MemoryStorage, SQLiteStorage, StorageBackend
from .app import create_app
from .checkpoints import CheckpointSigner, default_origin, load_signer_key
from .config import ConfigError, ConfigProblem, DaemonConfig, LedgerSettings
from .connections import HttpServer
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
        storage: StorageBackend = (
            MemoryStorage() if path is None else SQLiteStorage(path, durability=settings.durability)
        )
        engine = LedgerEngine(settings.ledger_config(), storage)
        instrument = None if metrics is None else metrics.instrument(settings.id)
        for position, module in enumerate(settings.modules):
            where = f"ledgers[{index}].modules[{position}] (ledger {settings.id!r}, "
            where += f"module {module.use!r})"
            try:
                engine.register(module.spec(instrument=instrument))
            except (NucleusError, ValueError, TypeError) as exc:
                problems.append(ConfigProblem(where, f"cannot register the module: {exc}"))
        hosts[settings.id] = LedgerHost(settings, engine, path)
        try:
            hosts[settings.id].signer = _signer(config, settings, engine, accept_rollback)
        except ValueError as exc:
            problems.append(ConfigProblem(f"ledgers[{index}].checkpoint_key", str(exc)))
    problems += preflight(config, hosts)  # what `check` and `run` both refuse (exit 2)
    if problems:
        raise ConfigError("configuration", problems)
    return hosts


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
        environ: dict[str, str] | None = None,
        force_exit: Callable[[int], object] = os._exit,
        accept_rollback: bool = False,
    ) -> None:
        self.config = config
        self.host = config.host if host is None else host
        self.port = config.port if port is None else port
        env = os.environ if environ is None else environ
        self.metrics = DaemonMetrics()
        """This daemon's metrics (its own registry), served at `/metrics`."""
        self.state = DaemonState(
            build_hosts(config, metrics=self.metrics, accept_rollback=accept_rollback),
            token=env.get(config.token_env) or None,
            max_body_bytes=config.max_body_bytes,
            metrics=self.metrics,
            limits=config.http_limits(),
        )
        self.urls: list[str] = []
        """Where the server listens once bound (`http://HOST:PORT`)."""
        self._force_exit = force_exit
        self._stop = trio.Event()
        self._release = trio.Event()  # set once the server stopped: ledgers may stop now
        self._exit_code = EXIT_OK
        self._signals = 0

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
            host.serving = False
            host.failure = exc
            self._ledger_failed(host, exc, started=started)
        finally:
            host.serving = False
            host.notify()
            if not started:
                task_status.started()

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

    def _ledger_failed(self, host: LedgerHost, exc: BaseException, *, started: bool) -> None:
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
        config.accesslog = None
        http_log = logging.getLogger("nucleus_actors.daemon.http")
        config.errorlog = http_log
        return config

    async def _serve(self) -> None:
        """Serve HTTP until stop is requested and in-flight requests finished."""
        app = create_app(self.state)
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
        if self.state.token is not None:
            log.info("writes need a bearer token (from $%s)", env)
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
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as receiver:
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
                await ledgers.start(self._run_ledger, host)
            if not self._stop.is_set():
                await self._serve()
            await self._stop.wait()
            self._release.set()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
