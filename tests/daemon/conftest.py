"""Daemon test helpers: run `nucleus run` as a real subprocess and talk to it over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from nucleus_actors import LedgerEngine
from nucleus_actors.daemon import DaemonState, LedgerHost, create_app, parse_config

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (https?://[^\s\"]+)")
STARTUP_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a daemon subprocess: the repo importable, no ambient token."""
    env = {k: v for k, v in os.environ.items() if k != "NUCLEUS_TOKEN"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def nucleus(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m nucleus_actors ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "nucleus_actors", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        timeout=EXIT_TIMEOUT,
        check=False,
    )


class DaemonProcess:
    """`nucleus run CONFIG --port 0` in a subprocess; its stderr is collected line by line."""

    def __init__(
        self,
        config: Path,
        *args: str,
        preexec: Callable[[], object] | None = None,
        prefix: Sequence[str] = (),
        **env: str,
    ) -> None:
        self.proc = subprocess.Popen(
            [
                *prefix,  # e.g. `ip netns exec NS` to run it in a network namespace
                sys.executable,
                "-m",
                "nucleus_actors",
                "run",
                str(config),
                "--port",
                "0",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(**env),
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                match = LISTENING.search(line)
                if match and self.url is None:
                    self.url = match.group(1)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self) -> str:
        """The base URL once the daemon logged `listening on`; fails with the log otherwise."""
        with self._changed:
            self._changed.wait_for(lambda: self.url is not None or self._eof, STARTUP_TIMEOUT)
        if self.url is None:
            self.close()
            raise AssertionError(f"daemon did not start listening:\n{self.log}")
        return self.url

    def wait_log(self, pattern: str) -> str:
        """Wait (bounded) until a log line matches `pattern`; return that line."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((line for line in self.lines if regex.search(line)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._eof, STARTUP_TIMEOUT)
            line = found()
        if line is None:
            raise AssertionError(f"no log line matches {pattern!r}:\n{self.log}")
        return line

    def send(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self) -> int:
        """Wait for the exit (bounded) and return the exit status."""
        code = self.proc.wait(EXIT_TIMEOUT)
        self._reader.join(EXIT_TIMEOUT)
        return code

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum` and return the exit status."""
        self.send(signum)
        return self.wait()

    def close(self) -> None:
        """Kill it if it still runs; release its pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT)
        self._reader.join(EXIT_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def running_daemon(directory: Path, config: str, **env: str) -> Iterator[DaemonProcess]:
    """A listening `nucleus run` of `config` (written to DIRECTORY/nucleus.toml), closed on
    exit: the body of a module-scoped daemon fixture."""
    path = directory / "nucleus.toml"
    path.write_text(config)
    daemon = DaemonProcess(path, **env)
    try:
        daemon.wait_listening()
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def start_daemon() -> Iterator[Any]:
    """`start_daemon(config, *args, **env)` -> a listening `DaemonProcess`, killed at teardown."""
    started: list[DaemonProcess] = []

    def start(config: Path, *args: str, **env: str) -> DaemonProcess:
        daemon = DaemonProcess(config, *args, **env)
        started.append(daemon)
        daemon.wait_listening()
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def client(url: str, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=20.0)


def read_events(response: httpx.Response, count: int) -> list[dict[str, str]]:
    """The next `count` events of an SSE response (comments skipped)."""
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if current:
                events.append(current)
                current = {}
                if len(events) == count:
                    return events
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        current[field] = value.removeprefix(" ")
    raise AssertionError(f"stream ended after {len(events)} events")


def serving_main(
    engine: LedgerEngine,
    *,
    token: str | None = None,
    max_body_bytes: int = 1 << 20,
    **options: Any,
) -> DaemonState:
    """What the HTTP API sees of a daemon with one ledger, "main" (in memory), serving
    `engine` (its host: `.hosts["main"]`); `options` go to `DaemonState`."""
    settings = parse_config(
        {"ledgers": [{"id": "main", "storage": ":memory:"}]}, base_dir=Path(".")
    ).ledgers[0]
    host = LedgerHost(settings, engine, None)
    host.serving = True
    return DaemonState({"main": host}, token=token, max_body_bytes=max_body_bytes, **options)


@contextlib.asynccontextmanager
async def app_client(
    state: DaemonState, base_url: str = "http://test"
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the API app for `state`, in process (httpx's ASGI transport)."""
    transport = httpx.ASGITransport(app=create_app(state))
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
        yield client


def toml_str(path: Path) -> str:
    """A path as a TOML basic string."""
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
