"""The API app in process (httpx's ASGI transport over a live engine): paging details."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from nucleus_actors import LedgerConfig, LedgerEngine, Record, open_ledger
from nucleus_actors.daemon import DaemonState, LedgerHost
from nucleus_actors.daemon import app as app_module

from .conftest import app_client, serving_main


async def test_range_reads_stop_at_the_page_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "MAX_PAGE_BYTES", 300)
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        await engine.append_many([Record("k", {"text": "x" * 100, "n": n}) for n in range(7)])
        async with app_client(serving_main(engine)) as api:
            pages = []
            start: int | None = 0
            while start is not None:
                response = await api.get("/v1/ledgers/main/records", params={"start": start})
                page = response.json()
                pages.append([entry["seq"] for entry in page["entries"]])
                start = page["next"]
    # Each entry is ~150 canonical bytes: a page stops once it reaches 300.
    assert pages == [[0, 1], [2, 3], [4, 5], [6]]


def serving_host(engine: LedgerEngine) -> tuple[DaemonState, LedgerHost]:
    state = serving_main(engine)
    return state, state.hosts["main"]


async def test_a_stream_follows_appends_made_outside_http_and_keeps_alive(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        await engine.append(Record("old", 0))
        state, host = serving_host(engine)
        events = app_module._events(state, host, 0)
        first = await events.__anext__()
        assert first.startswith("id: 0\nevent: entry\n")
        # Appended by the engine directly: the stream wakes through engine.wait_length.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.append_many, [Record("new", 1), Record("new", 2)])
            assert (await events.__anext__()).startswith("id: 1\n")
        assert (await events.__anext__()).startswith("id: 2\n")
        start = trio.current_time()
        assert await events.__anext__() == ": keep-alive\n\n"
        assert trio.current_time() - start == pytest.approx(app_module.HEARTBEAT_SECONDS)
        # The daemon stopping ends the stream, saying so (clients wait before retrying).
        state.begin_stopping()
        assert (await events.__anext__()).startswith("event: shutdown\ndata: ")
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()


async def test_a_stream_sends_an_error_event_once_the_ledger_will_not_grow() -> None:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        state, host = serving_host(engine)
        events = app_module._events(state, host, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.append, Record("last", 1))
            assert (await events.__anext__()).startswith("id: 0\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.stop_all)  # host.serving stays true: wait_length tells
            error = await events.__anext__()
        assert error.startswith("event: error\ndata: ")
        body = json.loads(error.split("data: ", 1)[1])
        assert body["type"].endswith("/ledger-unavailable")
        assert body["phase"] == "stopped"
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()


async def test_stalls_reach_the_modules_route_and_metrics() -> None:
    """A module that blocks the event loop: `stalls` in the status and in /metrics."""
    import time

    from nucleus_actors import Hash, Module

    class Sleepy(Module):
        id = "sleepy"

        async def after_append(self, record: Record, hash: Hash) -> None:
            time.sleep(0.3)  # noqa: ASYNC251 - the blocking call under test

    async with open_ledger(LedgerConfig(ledger_id="main"), modules=[Sleepy()]) as engine:
        await engine.append(Record("k", 1))
        while engine.modules.get("sleepy").status.processed < 1:
            await trio.sleep(0.01)
        async with app_client(serving_main(engine)) as api:
            modules = (await api.get("/v1/ledgers/main/modules")).json()["modules"]
            metrics = (await api.get("/metrics")).text
    assert [m["stalls"] for m in modules] == [1]
    assert 'nucleus_module_stalls_total{ledger="main",module="sleepy"} 1.0' in metrics
