"""Lifecycle events (`GET .../events`), statistics and the dashboard's files (`/ui`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from nucleus_actors import Hash, LedgerConfig, Module, ModuleState, Record, open_ledger
from nucleus_actors.daemon import DaemonState, LedgerHost
from nucleus_actors.daemon import events as events_module
from nucleus_actors.daemon.ui import ASSETS

from .conftest import app_client, serving_main

REPO = Path(__file__).resolve().parents[2]


class Boom(Module):
    """Crashes once per "boom" entry (a redelivery after the restart goes through)."""

    id = "boom"
    crashed: ClassVar[set[int]] = set()

    async def after_append(self, record: Record, hash: Hash) -> None:
        if record.kind == "boom" and record.seq not in self.crashed:
            self.crashed.add(record.seq)
            raise RuntimeError("boom on cue")


class Quiet(Module):
    id = "quiet"


def serving(engine: Any) -> tuple[DaemonState, LedgerHost]:
    state = serving_main(engine)
    return state, state.hosts["main"]


def parse_sse(chunk: str) -> dict[str, Any]:
    fields = dict(line.split(": ", 1) for line in chunk.strip().splitlines())
    data: dict[str, Any] = json.loads(fields["data"])
    assert fields["event"] == "lifecycle"
    assert int(fields["id"]) == data["id"]
    return data


async def test_a_crash_and_its_restart_become_events_in_order(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with open_ledger(
        LedgerConfig(ledger_id="main", max_restarts=5), modules=[Boom(), Quiet()]
    ) as engine:
        state, host = serving(engine)
        log = events_module.lifecycle_log(host)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(events_module.watch_lifecycle, state)
            await trio.sleep(0.1)
            first = [(e.module, e.type, e.state) for e in log.after(0)]
            assert first == [("boom", "state", "running"), ("quiet", "state", "running")]
            await engine.append(Record("boom", None))
            await engine.modules.get("boom").wait_state(ModuleState.RESTARTING)
            await engine.modules.get("boom").wait_state(ModuleState.RUNNING)
            await trio.sleep(1.0)  # a poll period: the restart counter is compared too
            later = log.after(2)
            assert {e.module for e in later} == {"boom"}
            # The watcher may see the new state before the crash counter (or both at once):
            # the state changes keep their order, the crash comes before the restart.
            states = [(e.previous, e.state) for e in later if e.type == "state"]
            assert states == [("running", "restarting"), ("restarting", "running")]
            (crash,) = [e for e in later if e.type == "crash"]
            (restart,) = [e for e in later if e.type == "restart"]
            assert crash.id < restart.id
            assert (crash.crashes, crash.count) == (1, 1)
            assert (restart.restarts, restart.incarnation) == (1, 2)
            assert crash.last_error is not None
            assert "boom on cue" in crash.last_error
            kept = log.after(0)
            assert [e.id for e in kept] == list(range(1, 7))

            # The SSE body replays the kept history after `after`, then follows.
            body = events_module._events_body(state, log, 4)
            replay = [parse_sse(await body.__anext__()) for _ in range(2)]
            assert [e["id"] for e in replay] == [5, 6]
            assert replay[1] == kept[5].json()
            await engine.append(Record("boom", None))
            live = parse_sse(await body.__anext__())
            assert live["id"] == 7
            assert live["type"] in ("crash", "state")
            await body.aclose()
            state.begin_stopping()
    # The watchers ended with the daemon's stop.
    assert state.stopping


async def test_history_is_bounded_and_ids_stay_consecutive() -> None:
    async with open_ledger(LedgerConfig(ledger_id="main"), modules=[Quiet()]) as engine:
        status = engine.modules.get("quiet").status
        log = events_module.LifecycleLog("main", capacity=3)
        for _ in range(5):
            log.add(status, "state")
        assert [e.id for e in log.after(0)] == [3, 4, 5]
        assert log.last_id == 5
        with trio.move_on_after(0.01) as waited:
            await log.wait_after(5)
        assert waited.cancelled_caught


async def test_events_route_and_statistics_over_http() -> None:
    async with open_ledger(LedgerConfig(ledger_id="main"), modules=[Boom()]) as engine:
        await engine.append_many([Record("k", n) for n in range(3)])
        state, host = serving(engine)
        events_module.lifecycle_log(host).add(engine.modules.get("boom").status, "state")
        async with app_client(state) as api:
            response = await api.get("/v1/ledgers/main/statistics")
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["ledger"] == "main"
            assert body["length"] == 3
            assert body["appends"] == 3
            assert body["head"] == engine.state.head.hex()
            assert body["modules"]["running"] == 1
            assert body["last_event"] == 1
            missing = await api.get("/v1/ledgers/nope/statistics")
            assert missing.status_code == 404
            bad = await api.get("/v1/ledgers/main/events", headers={"Last-Event-ID": "x"})
            assert bad.status_code == 422
            assert "Last-Event-ID" in bad.json()["detail"]
            assert (await api.get("/v1/ledgers/nope/events")).status_code == 404
            paths = (await api.get("/openapi.json")).json()["paths"]
            assert "/v1/ledgers/{ledger}/events" in paths
            assert "/v1/ledgers/{ledger}/statistics" in paths
            assert not any(path.startswith("/ui") for path in paths)


async def test_the_dashboard_is_served_without_anything_from_elsewhere() -> None:
    async with (
        open_ledger(LedgerConfig(ledger_id="main")) as engine,
        app_client(serving_main(engine)) as api,
    ):
        redirect = await api.get("/ui")
        assert redirect.status_code == 308
        assert redirect.headers["location"] == "/ui/"
        page = await api.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        assert "http://" not in html
        assert "https://" not in html
        scripts = [part.split('"', 1)[0] for part in html.split('src="')[1:]]
        assert scripts
        for src in scripts:
            assert src.startswith("/ui/assets/"), src
            asset = await api.get(src)
            assert asset.status_code == 200
            assert asset.headers["content-type"].startswith("text/javascript")
            assert "immutable" in asset.headers["cache-control"]
        escape = await api.get("/ui/..%2F..%2Fapp.py")
        assert escape.status_code == 404
        assert (await api.get("/ui/nope.js")).status_code == 404


def _source_digest() -> str:
    """The digest `npm run build:ui` writes into the built page (clients/typescript)."""
    root = REPO / "clients" / "typescript"
    files = [p for p in (root / "dashboard").rglob("*") if p.is_file()]
    # The generated API types are erased by the build: regenerating them needs no rebuild.
    files += [p for p in (root / "src").rglob("*.ts") if "generated" not in p.parts]
    files += [root / "package-lock.json", root / "vite.config.ts"]
    digest = hashlib.sha256()
    for name in sorted(path.relative_to(root).as_posix() for path in files):
        digest.update(name.encode() + b"\0")
        digest.update((root / name).read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.mark.skipif(
    not (REPO / "clients" / "typescript" / "dashboard").is_dir(),
    reason="the TypeScript sources are not in this tree (installed package)",
)
def test_the_committed_dashboard_is_built_from_the_current_sources() -> None:
    stamp = (ASSETS / "source.sha256").read_text().strip()
    assert stamp == _source_digest(), (
        "the dashboard sources changed since the committed build: run "
        "`npm run build:ui` in clients/typescript and commit nucleus_actors/daemon/dashboard"
    )


def test_a_running_daemon_records_its_modules_lifecycle(tmp_path: Path) -> None:
    from tests.daemon.conftest import DaemonProcess, client

    config = tmp_path / "nucleus.toml"
    config.write_text(
        '[[ledgers]]\nid = "main"\nstorage = ":memory:"\n\n'
        '[[ledgers.modules]]\nuse = "kind-counter"\n'
    )
    daemon = DaemonProcess(config)
    try:
        url = daemon.wait_listening()
        with client(url) as api, api.stream("GET", "/v1/ledgers/main/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            message = [next(lines) for _ in range(3)]
        assert message[:2] == ["id: 1", "event: lifecycle"]
        data = json.loads(message[2].removeprefix("data: "))
        assert (data["module"], data["type"], data["state"]) == ("kind-counter", "state", "running")
        with client(url) as api:
            assert api.get("/v1/ledgers/main/statistics").json()["last_event"] == 1
    finally:
        daemon.close()
