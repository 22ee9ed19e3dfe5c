"""The asyncio examples, run as users run them: the script directly, the FastAPI app on uvicorn
in a subprocess (driven over HTTP with httpx, then shut down with Ctrl+C)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from nucleus_actors import LedgerConfig, open_ledger
from nucleus_actors.storage import SQLiteStorage

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_asyncio_script_prints_totals_and_stops(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "asyncio_script.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "bob: payment of -5 refused: module 'totals' rejected the record: " in lines[0]
    assert lines[1:4] == [
        "committed 6 payments",
        "totals: {'alice': 875, 'bob': 1300, 'carol': 42}",
        "entries read back: 6",
    ]
    assert re.fullmatch(r"chain verified, head [0-9a-f]{64}", lines[4])
    assert lines[5] == "ledger stopped"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[httpx.Client, subprocess.Popen[str]]]:
    """The FastAPI example on uvicorn, listening on a socket we bound (a free port, no race)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    env = {**os.environ, "ORDERS_DB": str(tmp_path / "orders.db")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "fastapi_app:app",
            "--app-dir",
            str(EXAMPLES),
            "--fd",
            str(listener.fileno()),
        ],
        cwd=tmp_path,
        env=env,
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    listener.close()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            # The socket accepts at once; the lifespan (the ledger opening) answers first.
            client.get("/ledger").raise_for_status()
            yield client, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


def test_fastapi_app_end_to_end(
    server: tuple[httpx.Client, subprocess.Popen[str]], tmp_path: Path
) -> None:
    client, process = server
    created = client.post("/orders", json={"customer": "c-17", "amount": 1250})
    assert created.status_code == 201
    assert created.json()["seq"] == 0
    refused = client.post("/orders", json={"customer": "c-18", "amount": -5})
    assert refused.status_code == 422
    assert "amount must be a positive integer of cents, got -5" in refused.json()["detail"]
    assert client.post("/orders", json={"customer": "", "amount": 5}).status_code == 422
    second = client.post("/orders", json={"customer": "c-18", "amount": 300}).json()
    assert second["seq"] == 1

    orders = client.get("/orders").json()
    assert [(o["seq"], o["customer"], o["amount"]) for o in orders] == [
        (0, "c-17", 1250),
        (1, "c-18", 300),
    ]
    assert client.get("/orders/1").json()["hash"] == second["hash"]
    assert client.get("/orders/7").status_code == 404
    assert client.get("/ledger").json() == {
        "phase": "running",
        "length": 2,
        "head": second["hash"],
    }

    # Ctrl+C: uvicorn shuts down, the lifespan leaves `aio.open_ledger`, the ledger stops.
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert process.stdout is not None
    output = process.stdout.read()
    assert "Application shutdown complete." in output
    assert "Traceback" not in output

    async def reopen() -> None:  # what the app stored is there, and its chain verifies
        storage = SQLiteStorage(tmp_path / "orders.db")
        async with open_ledger(LedgerConfig(ledger_id="orders"), storage=storage) as engine:
            assert engine.state.length == 2
            assert str(await engine.verify()) == second["hash"]

    trio.run(reopen)
