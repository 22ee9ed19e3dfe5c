"""Shared fixtures and helper modules for the test suite."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from nucleus_actors import Hash, Module, ModuleContext, Record

# pytester tests the nucleus_actors pytest plugin (tests/faults/); it must be enabled here, in
# the top-level conftest (pytest refuses `pytest_plugins` in nested ones).
pytest_plugins = ["pytester"]


# Far beyond any deadline the tests use: reaching it means "hung forever" (MockClock autojumps).
FOREVER = 1000.0


async def settle() -> None:
    """Let the supervisor finish what it is doing (the clock is mocked where time matters)."""
    await trio.testing.wait_all_tasks_blocked()


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead whenever every task is blocked (no real sleeps)."""
    return trio.testing.MockClock(autojump_threshold=0)


class Recorder(Module):
    """Appends `(module_id, event, detail)` to a shared log for every callback it gets.

    Hooks can be made to fail: `fail_on` maps an event name ("init", "start", "stop",
    "before", "after") to a predicate on the call number (1-based) or on the record.
    """

    def __init__(
        self,
        module_id: str,
        log: list[tuple[str, str, Any]],
        *,
        fail: dict[str, Callable[[int, Any], bool]] | None = None,
        hang: dict[str, Callable[[int, Any], bool]] | None = None,
    ) -> None:
        self.id = module_id
        self.events = log
        self.calls: dict[str, int] = {}
        self.fail = fail or {}
        self.hang = hang or {}
        self.seen: list[int] = []

    async def _event(self, name: str, detail: Any = None) -> None:
        n = self.calls[name] = self.calls.get(name, 0) + 1
        self.events.append((self.id, name, detail))
        if name in self.hang and self.hang[name](n, detail):
            await trio.sleep_forever()
        if name in self.fail and self.fail[name](n, detail):
            raise RuntimeError(f"{self.id} fails in {name} (call {n})")

    async def init(self, ctx: ModuleContext) -> None:
        await self._event("init")

    async def start(self, ctx: ModuleContext) -> None:
        await self._event("start")

    async def stop(self, ctx: ModuleContext) -> None:
        await self._event("stop")

    async def after_append(self, record: Record, hash: Hash) -> None:
        await self._event("after", record.seq)
        assert record.seq is not None
        self.seen.append(record.seq)


class Gate(Recorder):
    """A Recorder that also has a before_append (so appends are fail-closed on it)."""

    async def before_append(self, record: Record) -> Record | None:
        await self._event("before", record.payload)
        return None


def lifecycle(log: list[tuple[str, str, Any]]) -> list[tuple[str, str]]:
    """The init/start/stop events of a log, in order."""
    return [(m, e) for m, e, _ in log if e in ("init", "start", "stop")]


async def kill_after_lines(command: Sequence[str], lines: int) -> list[str]:
    """Run `command`, SIGKILL it once it printed `lines` lines; every line it printed.

    Lines written before the kill are still in the pipe and count too (for a crash test they
    were acknowledged); a torn last line (no newline) is left out.
    """
    proc = await trio.lowlevel.open_process(list(command), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = bytearray()
    try:
        while out.count(b"\n") < lines:
            chunk = await proc.stdout.receive_some()
            assert chunk, f"the writer exited early (code {await proc.wait()})"
            out += chunk
        proc.kill()  # SIGKILL: no cleanup, no close, no checkpoint
        while chunk := await proc.stdout.receive_some():
            out += chunk
    finally:
        proc.kill()
        await proc.wait()
        await proc.stdout.aclose()
    assert proc.returncode == -9
    return out.decode().split("\n")[:-1]


# The supervisor's transition tables are strict under test: a lifecycle transition they do not
# list raises (in production it is logged and applied).
import nucleus_actors._transitions as _transitions  # noqa: E402

_transitions.STRICT = True
