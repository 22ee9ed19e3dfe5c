"""Daemon process lifecycle: graceful shutdown, restart, ledger failure policies, signals."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx

from nucleus_actors import Hash, Record
from nucleus_actors.hashing import canonical_bytes, chain_hash, leaf_hash

from .conftest import DaemonProcess, client, nucleus, toml_str


def write_config(directory: Path, body: str) -> Path:
    config = directory / "nucleus.toml"
    config.write_text(body.replace("@DIR@", toml_str(directory)))
    return config


def append(api: httpx.Client, ledger: str, kind: str, payload: Any = None) -> httpx.Response:
    return api.post(f"/v1/ledgers/{ledger}/records", json={"kind": kind, "payload": payload})


GRACEFUL = """
[[ledgers]]
id = "durable"
storage = "durable.db"

[[ledgers.modules]]
use = "tests.daemon.testmods:StopMarker"
id = "first"
config = { dir = @DIR@ }

[[ledgers.modules]]
use = "tests.daemon.testmods:Gate"
config = { dir = @DIR@ }

[[ledgers.modules]]
use = "tests.daemon.testmods:StopMarker"
id = "last"
config = { dir = @DIR@ }

[[ledgers]]
id = "scratch"
storage = ":memory:"

[[ledgers.modules]]
use = "tests.daemon.testmods:StopMarker"
config = { dir = @DIR@ }
"""


def test_sigterm_finishes_in_flight_stops_modules_and_a_restart_continues_the_chain(
    tmp_path: Path, start_daemon: Any
) -> None:
    config = write_config(tmp_path, GRACEFUL)
    daemon: DaemonProcess = start_daemon(config)
    url = daemon.wait_listening()
    with client(url) as api:
        receipts = [append(api, "durable", "note", n).json() for n in range(3)]
        assert [r["seq"] for r in receipts] == [0, 1, 2]
        assert append(api, "scratch", "note").status_code == 201

        # An append held inside a module's before_append while the signal arrives.
        in_flight: dict[str, httpx.Response] = {}

        def slow_append() -> None:
            with client(url) as other:
                in_flight["response"] = append(other, "durable", "slow", "in flight")

        writer = threading.Thread(target=slow_append)
        with api.stream("GET", "/v1/ledgers/durable/stream", params={"from": 0}) as stream:
            writer.start()
            daemon_dir = tmp_path
            for _ in range(3000):  # bounded: the writer must reach the gate
                if (daemon_dir / "entered").exists():
                    break
                assert writer.is_alive(), in_flight
                writer.join(0.01)
            else:
                raise AssertionError("the slow append never reached the module")
            daemon.send(signal.SIGTERM)
            daemon.wait_log("SIGTERM received")
            # New connections are refused once the server stopped accepting.
            for _ in range(500):
                try:
                    httpx.get(f"{url}/healthz", timeout=1.0)
                except httpx.TransportError:
                    break
                writer.join(0.01)
            else:
                raise AssertionError("the daemon still accepts connections after SIGTERM")
            (daemon_dir / "release").write_text("go")
            writer.join(30)
            # The stream ends (after delivering what it had): iterating terminates.
            ids = [line for line in stream.iter_lines() if line.startswith("id:")]
        assert ids[:3] == ["id: 0", "id: 1", "id: 2"]

    assert daemon.wait() == 0, daemon.log
    response = in_flight["response"]
    assert response.status_code == 201, response.text
    assert response.json()["seq"] == 3
    # Every module's stop ran, after the in-flight append committed.
    for name, length in [("durable.first", 4), ("durable.last", 4), ("scratch.marker", 1)]:
        marker = tmp_path / f"{name}.stopped"
        assert marker.read_text() == str(length), name
    assert daemon.log.index("ledger 'durable' stopped") > daemon.log.index("HTTP server stopped")
    assert "Traceback" not in daemon.log

    # Restart on the same file: the chain continues from the last entry.
    (tmp_path / "entered").unlink()
    again: DaemonProcess = start_daemon(config)
    with client(again.wait_listening()) as api:
        head = api.get("/v1/ledgers/durable/head").json()
        assert head["length"] == 4
        last = api.get("/v1/ledgers/durable/records/3").json()
        assert head["head"] == last["hash"]
        receipt = append(api, "durable", "note", "after restart").json()
        assert receipt["seq"] == 4
        entry = api.get("/v1/ledgers/durable/records/4").json()
        record = Record("note", "after restart", seq=4, timestamp=entry["timestamp"])
        linked = chain_hash(Hash.from_hex(last["hash"]), 4, leaf_hash(canonical_bytes(record)))
        assert receipt["hash"] == linked.hex()
        # The in-memory ledger starts over.
        assert api.get("/v1/ledgers/scratch/head").json()["length"] == 0
    assert again.stop() == 0

    verified = nucleus("verify", str(tmp_path / "durable.db"))
    assert verified.returncode == 0, verified.stderr
    assert f"5 entries, head {receipt['hash']}" in verified.stdout


FAILURE = """
on_ledger_failure = "{policy}"

[[ledgers]]
id = "fragile"
storage = ":memory:"
max_restarts = 0

[[ledgers.modules]]
use = "tests.daemon.testmods:Boom"

[[ledgers]]
id = "steady"
storage = "steady.db"

[[ledgers.modules]]
use = "tests.daemon.testmods:StopMarker"
config = {{ dir = @DIR@ }}
"""


def test_ledger_failure_exits_non_zero_by_default(tmp_path: Path, start_daemon: Any) -> None:
    config = write_config(tmp_path, FAILURE.format(policy="exit"))
    daemon: DaemonProcess = start_daemon(config, "--log-format", "json")
    with client(daemon.wait_listening()) as api:
        assert append(api, "steady", "note").status_code == 201
        # after_append crashes after the commit: the append itself succeeds.
        assert append(api, "fragile", "boom").status_code == 201
    assert daemon.wait() == 1, daemon.log
    records = [json.loads(line) for line in daemon.lines]  # --log-format json: one per line
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    messages = [r["message"] for r in records if r["logger"] == "nucleus_actors.daemon"]
    assert f"listening on {daemon.url}" in messages
    failed = next(m for m in messages if m.startswith("ledger 'fragile' failed"))
    assert "LedgerFailed" in failed
    assert "boom on cue" in failed
    # The other ledger was stopped cleanly.
    assert (tmp_path / "steady.marker.stopped").read_text() == "1"


def test_ledger_failure_with_serve_answers_503_and_keeps_the_others(
    tmp_path: Path, start_daemon: Any
) -> None:
    broken = """
[[ledgers]]
id = "broken"
storage = ":memory:"

[[ledgers.modules]]
use = "tests.daemon.testmods:FailsInit"
"""  # its init fails, the ledger does not start
    config = write_config(tmp_path, FAILURE.format(policy="serve") + broken)
    daemon: DaemonProcess = start_daemon(config)
    with client(daemon.wait_listening()) as api:
        with api.stream("GET", "/v1/ledgers/fragile/stream") as stream:
            assert append(api, "fragile", "note").status_code == 201
            lines = stream.iter_lines()
            assert [next(lines), next(lines)] == ["id: 0", "event: entry"]
            assert append(api, "fragile", "boom").status_code == 201
            daemon.wait_log("ledger 'fragile' failed")
            # Whatever it could still deliver, then an error event, then the end.
            rest = [line for line in lines if line.startswith(("event:", "data:"))]
        assert rest[-2] == "event: error"
        assert json.loads(rest[-1].removeprefix("data: "))["phase"] == "failed"
        listed = {entry["id"]: entry["phase"] for entry in api.get("/v1/ledgers").json()["ledgers"]}
        assert listed == {"fragile": "failed", "steady": "running", "broken": "failed"}
        assert append(api, "broken", "note").status_code == 503

        for response in (
            append(api, "fragile", "note"),
            api.get("/v1/ledgers/fragile/records/0"),
            api.get("/v1/ledgers/fragile/records"),
            api.get("/v1/ledgers/fragile/stream"),
        ):
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "1"
            body = response.json()
            assert body["type"].endswith("/ledger-unavailable")
            assert body["phase"] == "failed"
        head = api.get("/v1/ledgers/fragile/head").json()
        assert head["phase"] == "failed"
        assert head["length"] == 2
        modules = api.get("/v1/ledgers/fragile/modules").json()["modules"]
        assert "boom on cue" in modules[0]["last_error"]
        assert api.get("/readyz").status_code == 503

        assert append(api, "steady", "note").status_code == 201
        assert api.get("/v1/ledgers/steady/records/0").status_code == 200
    assert daemon.stop() == 0, daemon.log
    assert (tmp_path / "steady.marker.stopped").read_text() == "1"


def test_ledger_that_fails_to_start_stops_the_daemon(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
[[ledgers]]
id = "main"
storage = ":memory:"

[[ledgers.modules]]
use = "tests.daemon.testmods:FailsInit"
""",
    )
    daemon = DaemonProcess(config)
    try:
        assert daemon.wait() == 1
    finally:
        daemon.close()
    assert "ledger 'main' failed to start" in daemon.log
    assert "the device this module needs is gone" in daemon.log
    assert "listening on" not in daemon.log


def test_second_signal_forces_exit(tmp_path: Path, start_daemon: Any) -> None:
    config = write_config(
        tmp_path,
        """
[[ledgers]]
id = "main"
storage = ":memory:"

[[ledgers.modules]]
use = "tests.daemon.testmods:HangOnStop"
shutdown = inf
""",
    )
    daemon: DaemonProcess = start_daemon(config)
    daemon.send(signal.SIGINT)
    daemon.wait_log("SIGINT received: shutting down")
    daemon.wait_log("HTTP server stopped")
    daemon.send(signal.SIGTERM)
    assert daemon.wait() == 128 + signal.SIGTERM, daemon.log
    assert "forcing exit" in daemon.log


def test_locked_storage_and_busy_port_fail_startup(tmp_path: Path, start_daemon: Any) -> None:
    config = write_config(tmp_path, '[[ledgers]]\nid = "main"\nstorage = "main.db"\n')
    first: DaemonProcess = start_daemon(config)
    port = first.wait_listening().rsplit(":", 1)[1]

    # Same ledger file: the second daemon cannot take the writer lock.
    second = DaemonProcess(config)
    try:
        assert second.wait() == 1, second.log
    finally:
        second.close()
    assert "ledger 'main' failed to start: StorageError" in second.log
    assert "listening on" not in second.log

    # Another ledger, same port: it cannot bind.
    other = tmp_path / "other"
    other.mkdir()
    busy = write_config(other, '[[ledgers]]\nid = "main"\nstorage = ":memory:"\n')
    third = DaemonProcess(busy, "--port", port)
    try:
        assert third.wait() == 1, third.log
    finally:
        third.close()
    assert f"cannot listen on 127.0.0.1:{port}" in third.log
    assert "Traceback" not in third.log
    assert first.stop() == 0
