"""`nucleus backup` under concurrent appends, and `nucleus restore` from an export."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import httpx
import trio
from typer.testing import CliRunner

from nucleus_actors import LedgerConfig, Record, open_ledger
from nucleus_actors.cli import app
from nucleus_actors.hashing import genesis
from nucleus_actors.storage import SQLiteStorage, verify_file

from .conftest import DaemonProcess

runner = CliRunner()


def test_backup_of_a_live_ledger_under_concurrent_appends_verifies(
    start_daemon: object, tmp_path: Path
) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text('[[ledgers]]\nid = "main"\nstorage = "main.db"\n')
    daemon: DaemonProcess = start_daemon(config)  # type: ignore[operator]
    url = daemon.url
    stop = threading.Event()
    appended = [0]

    def writer() -> None:
        with httpx.Client(base_url=url) as api:
            n = 0
            while not stop.is_set():
                body = "".join(
                    json.dumps({"kind": "tick", "payload": {"n": n + i}}) + "\n" for i in range(50)
                )
                response = api.post(
                    "/v1/ledgers/main/records/stream",
                    content=body,
                    headers={"Content-Type": "application/x-ndjson"},
                )
                assert response.status_code == 200
                n += 50
                appended[0] = n

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while appended[0] < 200:
            threading.Event().wait(0.05)
        copies = []
        for i in range(3):  # each copy taken while appends go on
            dest = tmp_path / f"copy{i}.db"
            result = runner.invoke(app, ["backup", str(tmp_path / "main.db"), str(dest)])
            assert result.exit_code == 0, result.output
            assert "(verified)" in result.stdout
            copies.append(dest)
    finally:
        stop.set()
        thread.join()
    lengths = []
    for dest in copies:
        length, head = trio.run(verify_file, dest)
        lengths.append(length)
        assert length >= 200
        # the copy is a prefix of the live ledger
        live = httpx.get(f"{url}/v1/ledgers/main/records/{length - 1}").json()
        assert live["hash"] == head.hex()
    assert lengths == sorted(lengths)
    assert not list(tmp_path.glob("*.partial"))
    again = runner.invoke(app, ["backup", str(tmp_path / "main.db"), str(copies[0])])
    assert again.exit_code == 2
    assert "exists" in again.stderr


async def _ledger_with_entries(path: Path, ledger_id: str, count: int) -> list[bytes]:
    """A SQLite ledger of `count` entries and its export lines (DESIGN "Exports" format)."""
    storage = SQLiteStorage(path)
    lines = [
        json.dumps(
            {"nucleus_export": 1, "ledger_id": ledger_id, "from": 0,
             "prev": genesis(ledger_id).hex()}
        ).encode()
    ]  # fmt: skip
    async with open_ledger(LedgerConfig(ledger_id=ledger_id), storage=storage) as engine:
        await engine.append_many(
            [Record("k", {"n": n, "x": [1.5, "é"]}, {"m": str(n)}) for n in range(count)]
        )
        async for entry in engine.read():
            record = entry.record
            lines.append(
                json.dumps(
                    {"seq": entry.seq, "kind": record.kind, "payload": record.payload,
                     "meta": dict(record.meta), "timestamp": record.timestamp,
                     "hash": entry.hash.hex(),
                     "canonical": base64.b64encode(entry.canonical).decode()}
                ).encode()
            )  # fmt: skip
    return lines


def test_restore_round_trip_and_refusals(tmp_path: Path) -> None:
    lines = trio.run(_ledger_with_entries, tmp_path / "orig.db", "orders", 2500)
    export = tmp_path / "orders.jsonl"
    export.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["restore", str(export), str(tmp_path / "new.db"), "-l", "orders"])
    assert result.exit_code == 0, result.output
    assert "2500 entries" in result.stdout
    assert trio.run(verify_file, tmp_path / "new.db") == trio.run(verify_file, tmp_path / "orig.db")

    def refused(name: str, content: bytes, *args: str) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        out = runner.invoke(app, ["restore", str(path), str(tmp_path / f"{name}.db"), *args])
        assert out.exit_code in (1, 2), out.output
        assert not (tmp_path / f"{name}.db").exists()
        assert not list(tmp_path.glob(f"{name}.db.partial*"))
        return out.stderr

    body = b"\n".join(lines) + b"\n"
    assert "of ledger 'orders', not 'other'" in refused("mismatch", body, "--ledger", "other")
    header = json.loads(lines[0])
    sliced = json.dumps({**header, "from": 5, "prev": json.loads(lines[5])["hash"]}).encode()
    assert "(a slice)" in refused("slice", b"\n".join([sliced, *lines[6:]]))
    assert "not an export header" in refused("headless", b"\n".join(lines[1:]))
    # one payload byte changed in an entry's canonical bytes: its hash no longer chains
    entry = json.loads(lines[100])
    raw = base64.b64decode(entry["canonical"]).replace(b'"n":99', b'"n":98')
    entry["canonical"] = base64.b64encode(raw).decode()
    entry["payload"]["n"] = 98
    tampered = [*lines[:100], json.dumps(entry).encode(), *lines[101:]]
    assert "integrity failure at seq 99" in refused("tampered", b"\n".join(tampered))
    # decoded fields that disagree with the canonical bytes
    entry = json.loads(lines[10])
    entry["payload"]["n"] = -1
    lying = [*lines[:10], json.dumps(entry).encode(), *lines[11:]]
    assert "do not match its canonical bytes" in refused("lying", b"\n".join(lying))
    # restore never overwrites
    (tmp_path / "taken.db").write_text("")
    out = runner.invoke(app, ["restore", str(export), str(tmp_path / "taken.db")])
    assert out.exit_code == 2
    assert "exists: restore writes a new file" in out.stderr
    assert (tmp_path / "taken.db").read_text() == ""
