"""Helpers for tests that run several daemons (separate processes) on one PostgreSQL schema."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.daemon.conftest import DaemonProcess, client


def pg_config(
    path: Path,
    dsn: str,
    schema: str,
    *,
    ledger: str = "main",
    role: str = "auto",
    lease: float = 5.0,
    extra: str = "",
) -> Path:
    """Write a daemon config with one PostgreSQL ledger; return its path."""
    path.write_text(
        f"""on_ledger_failure = "serve"
graceful_timeout = 2.0

[[ledgers]]
id = "{ledger}"
storage = "{dsn}"
schema = "{schema}"
role = "{role}"
lease_timeout = {lease}
{extra}
"""
    )
    return path


def wait_until(check: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll `check()` until it returns something truthy (bounded); return it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)


@contextlib.contextmanager
def logs_on_failure(**daemons: DaemonProcess) -> Iterator[None]:
    """A failed assertion in the block also shows the end of each daemon's log."""
    try:
        yield
    except AssertionError as exc:
        tails = "".join(
            f"\n--- {name}'s log (last 60 lines) ---\n" + "\n".join(daemon.lines[-60:])
            for name, daemon in daemons.items()
        )
        raise AssertionError(f"{exc}{tails}") from exc


def role_of(daemon: DaemonProcess, ledger: str = "main") -> str | None:
    """The ledger's role on `daemon` per /readyz (None if it does not answer)."""
    assert daemon.url is not None
    with client(daemon.url) as api:
        response = api.get("/readyz", timeout=2)
    body = response.json()
    ledgers = body.get("ledgers") or {}
    entry = ledgers.get(ledger)
    if not isinstance(entry, dict) or entry.get("phase") != "running":
        return None
    return str(entry.get("role"))
