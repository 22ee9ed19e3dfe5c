"""The stall detector: a TASK module's callback that blocks the event loop is warned about.

These tests run on the real clock on purpose: the watchdog is a thread that measures how long
the loop is really blocked (a MockClock would not block anything). They assert counts and
messages, never durations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from nucleus_actors import (
    Entry,
    Hash,
    LedgerConfig,
    LedgerFailed,
    Module,
    ModuleSpec,
    Record,
    Restart,
    open_ledger,
)
from nucleus_actors.storage import MemoryStorage

BLOCK = 0.3  # seconds a blocking callback sleeps: three times the default stall_warning


def config(**kw: Any) -> LedgerConfig:
    return LedgerConfig(ledger_id="stalls", **kw)


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nucleus stall watchdog")]


class Blocking(Module):
    """Blocks the event loop (time.sleep) in after_append, before_append or an ask."""

    def __init__(self, module_id: str = "blocker", *, where: str = "after_append") -> None:
        self.id = module_id
        self.where = where
        self.seen = 0

    async def before_append(self, record: Record) -> Record | None:
        if self.where == "before_append":
            time.sleep(BLOCK)  # noqa: ASYNC251 - the blocking call under test
        return None

    async def after_append(self, record: Record, hash: Hash) -> None:
        if self.where == "after_append":
            time.sleep(BLOCK)  # noqa: ASYNC251 - the blocking call under test
        self.seen += 1


class Polite(Module):
    """Waits as long, but with trio.sleep: the loop stays free."""

    id = "polite"

    def __init__(self) -> None:
        self.seen = 0

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep(BLOCK)
        self.seen += 1


def block_in_ask(module: Blocking) -> int:
    time.sleep(BLOCK)
    return module.seen


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "blocked the event loop" in r.getMessage()
    ]


async def wait_seen(module: Any, count: int) -> None:
    while module.seen < count:
        await trio.sleep(0.01)


def test_stall_warning_validation() -> None:
    assert config().stall_warning == 0.1
    assert config(stall_warning=None).stall_warning is None
    for bad in (0, -1, float("inf"), "0.1", True):
        with pytest.raises(ValueError, match=r"stall_warning must be a finite number > 0"):
            config(stall_warning=bad)


@pytest.mark.parametrize("where", ["after_append", "before_append"])
async def test_a_blocking_hook_is_one_stall_with_one_warning(
    where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nucleus_actors.supervisor")
    blocker, polite = Blocking(where=where), Polite()
    async with open_ledger(config(), modules=[blocker, polite]) as engine:
        await engine.append(Record("t", {"n": 1}))
        await wait_seen(blocker, 1)
        await wait_seen(polite, 1)
        status = {s.id: s for s in engine.modules.status()}
        assert status["blocker"].stalls == 1
        assert status["polite"].stalls == 0  # the stall is not blamed on a bystander
    messages = stall_warnings(caplog)
    assert len(messages) == 1, messages
    assert "'blocker'" in messages[0]
    assert where in messages[0]
    assert "'stalls'" in messages[0]  # the ledger
    assert "isolation=PROCESS" in messages[0]


async def test_a_blocking_ask_is_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nucleus_actors.supervisor")
    blocker = Blocking(where="nowhere")
    async with open_ledger(config(), modules=[blocker]) as engine:
        handle = engine.modules.get(Blocking)
        assert await handle.ask(block_in_ask) == 0
        assert handle.status.stalls == 1
    (message,) = stall_warnings(caplog)
    assert "in ask" in message


async def test_each_blocking_call_counts_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nucleus_actors.supervisor")
    blocker = Blocking()
    async with open_ledger(config(), modules=[blocker]) as engine:
        for n in range(2):
            await engine.append(Record("t", {"n": n}))
            await wait_seen(blocker, n + 1)
        assert engine.modules.get("blocker").status.stalls == 2
    assert len(stall_warnings(caplog)) == 2


async def test_no_watchdog_when_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nucleus_actors.supervisor")
    blocker = Blocking()
    async with open_ledger(config(stall_warning=None), modules=[blocker]) as engine:
        assert watchdogs() == []
        await engine.append(Record("t", {"n": 1}))
        await wait_seen(blocker, 1)
        assert engine.modules.get("blocker").status.stalls == 0
    assert stall_warnings(caplog) == []


async def test_awaiting_is_not_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nucleus_actors.supervisor")
    polite = Polite()
    async with open_ledger(config(stall_warning=0.05), modules=[polite]) as engine:
        for n in range(3):
            await engine.append(Record("t", {"n": n}))
        await wait_seen(polite, 3)
        assert engine.modules.get("polite").status.stalls == 0
    assert stall_warnings(caplog) == []


async def test_the_watchdog_thread_ends_with_the_ledger() -> None:
    before = watchdogs()
    async with open_ledger(config(), modules=[Polite()]):
        running = [t for t in watchdogs() if t not in before]
        assert len(running) == 1
        assert "stalls" in running[0].name
    assert all(not t.is_alive() for t in running)
    assert watchdogs() == before


class Fragile(Module):
    id = "fragile"

    async def after_append(self, record: Record, hash: Hash) -> None:
        raise RuntimeError("no")


async def test_the_watchdog_thread_ends_when_the_ledger_fails() -> None:
    before = watchdogs()
    with pytest.raises(LedgerFailed):
        async with open_ledger(
            config(max_restarts=0),
            modules=[ModuleSpec(Fragile(), restart=Restart.PERMANENT)],
        ) as engine:
            assert len(watchdogs()) == len(before) + 1
            await engine.append(Record("t", {"n": 1}))
            await trio.sleep_forever()  # the escalation ends the block
    assert watchdogs() == before


class SlowReads(MemoryStorage):
    """Reads block the event loop (a synchronous backend): the runtime's work, not a module's."""

    def read(self, start: int, stop: int | None = None) -> AsyncIterator[Entry]:
        inner = super().read(start, stop)

        async def blocking() -> AsyncIterator[Entry]:
            time.sleep(BLOCK)  # noqa: ASYNC251 - the blocking call under test
            async for entry in inner:
                yield entry

        return blocking()


class Count(Module):
    id = "count"

    def __init__(self) -> None:
        self.seen = 0

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.seen += 1


async def test_runtime_work_in_an_actor_is_not_blamed_on_the_module(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A durable module's catch-up reads from a storage that blocks the loop: the actor's stack
    is on the loop thread, but no callback of the module is the blocking call."""
    caplog.set_level(logging.WARNING, logger="nucleus_actors.supervisor")
    storage = SlowReads()
    async with open_ledger(config(), storage=storage) as engine:
        await engine.append_many([Record("t", {"n": n}) for n in range(3)])
    module = Count()
    async with open_ledger(
        config(), storage=storage, modules=[ModuleSpec(module, durable=True)]
    ) as engine:
        await wait_seen(module, 3)  # caught up through one blocking read
        assert engine.modules.get("count").status.stalls == 0
    assert stall_warnings(caplog) == []
