"""A real daemon against bad clients and a loaded shutdown (issue 15, sections 2, 4, 6, 7):
a raw-socket corpus of malformed requests (never a 5xx, always a problem object), slowloris
under a low open-file limit, and SIGTERM under 64 keep-alive writers."""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from .conftest import STARTUP_TIMEOUT, DaemonProcess, running_daemon

CONFIG = """
max_body_bytes = 65536
read_timeout = 3.0
[[ledgers]]
id = "main"
storage = "main.db"
durability = "normal"
"""


def address(daemon: DaemonProcess) -> tuple[str, int]:
    parts = urlsplit(daemon.wait_listening())
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def exchange(where: tuple[str, int], raw: bytes, *, timeout: float = 20.0) -> bytes:
    """Send `raw` on a fresh connection, half-close, and read until the server closes."""
    with socket.create_connection(where, timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before reading everything (431)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body


@pytest.fixture(scope="module")
def corpus_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("corpus"), CONFIG) as daemon:
        yield daemon


def post(path: str, body: bytes, *, host: str = "127.0.0.1:PORT", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def get(path: str, *, host: str = "127.0.0.1:PORT", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


RECORDS = "/v1/ledgers/main/records"
CORPUS: dict[str, tuple[bytes, int]] = {
    "surrogate key in payload": (post(RECORDS, rb'{"kind":"k","payload":{"\ud800":1}}'), 422),
    "surrogate key in meta": (
        post(RECORDS, rb'{"kind":"k","payload":1,"meta":{"\udc00":"v"}}'),
        422,
    ),
    "surrogate key in a batch": (
        post(RECORDS + "/batch", rb'{"records":[{"kind":"k","payload":{"\udbff":1}}]}'),
        422,
    ),
    "surrogate in kind": (post(RECORDS, rb'{"kind":"\ud800","payload":1}'), 422),
    "Last-Event-ID superscript": (
        get(
            "/v1/ledgers/main/stream",
            extra="Last-Event-ID: \xb2\r\n".encode("latin-1").decode("latin-1"),
        ),
        422,
    ),
    "Last-Event-ID 5000 digits": (
        get("/v1/ledgers/main/stream", extra=f"Last-Event-ID: {'9' * 5000}\r\n"),
        422,
    ),
    "metrics bad openmetrics version": (
        get("/metrics", extra="Accept: application/openmetrics-text; version=abc\r\n"),
        200,
    ),
    "Content-Length not a number": (
        b"POST /v1/ledgers/main/records HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
        b"Content-Type: application/json\r\nContent-Length: 12a\r\n\r\n{}",
        400,
    ),
    "two Content-Lengths": (
        b"POST /v1/ledgers/main/records HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    "64 KiB header": (get("/healthz", extra=f"X-Big: {'a' * 65536}\r\n"), 431),
    "garbage request line": (b"\x00\x01\x02 nonsense\r\n\r\n", 400),
    "bad chunked body": (
        b"POST /v1/ledgers/main/records HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    "foreign Host": (get("/v1/ledgers", host="attacker.example:PORT"), 421),
    "foreign Host write": (
        post(RECORDS, b'{"kind":"k","payload":1}', host="attacker.example:PORT"),
        421,
    ),
    "no Host (HTTP/1.0)": (b"GET /v1/ledgers HTTP/1.0\r\n\r\n", 400),
    "no Host (HTTP/1.1)": (b"GET /v1/ledgers HTTP/1.1\r\n\r\n", 400),
    "bad JSON": (post(RECORDS, b'{"kind": '), 400),
    "deep JSON": (
        post(RECORDS, b'{"kind":"k","payload":' + b"[" * 30000 + b"]" * 30000 + b"}"),
        400,
    ),
    "NaN": (post(RECORDS, b'{"kind":"k","payload":NaN}'), 422),
    "huge integer": (post(RECORDS, b'{"kind":"k","payload":' + b"9" * 5000 + b"}"), 400),
    "seq beyond any": (get("/v1/ledgers/main/records/99999999999999999999999"), 404),
    "unknown ledger": (get("/v1/ledgers/%ff/head"), 404),
    "body on a GET": (
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\nContent-Length: 3\r\n\r\nabc",
        200,
    ),
    "short body": (
        b"POST /v1/ledgers/main/records HTTP/1.1\r\nHost: 127.0.0.1:PORT\r\n"
        b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{}",
        400,
    ),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_malformed_requests_get_a_problem_object_never_a_5xx(
    corpus_daemon: DaemonProcess, name: str
) -> None:
    where = address(corpus_daemon)
    raw, expected = CORPUS[name]
    raw = raw.replace(b"PORT", str(where[1]).encode())
    status, headers, body = parse(exchange(where, raw))
    assert status < 500, (name, status, body[:300])
    assert status == expected, (name, body[:300])
    if status >= 400:
        assert headers["content-type"] == "application/problem+json", (name, headers)
        problem = json.loads(body)
        assert problem["status"] == status
        assert problem["type"].startswith("tag:nucleus-actors,2025:problem/")
    assert "Traceback" not in corpus_daemon.log


def test_the_corpus_left_the_ledger_empty(corpus_daemon: DaemonProcess) -> None:
    where = address(corpus_daemon)
    status, _, body = parse(
        exchange(where, get("/v1/ledgers/main/head", host=f"localhost:{where[1]}"))
    )
    assert status == 200
    assert json.loads(body)["length"] == 0


# -- slowloris -------------------------------------------------------------------------------
SLOW = """
read_timeout = 30.0
[[ledgers]]
id = "main"
storage = ":memory:"
"""


def limited_daemon(config: Path, nofile: int) -> DaemonProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return DaemonProcess(config, preexec=limit)


def test_slow_clients_beyond_the_file_limit_do_not_take_the_daemon_offline(tmp_path: Path) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(SLOW)
    daemon = limited_daemon(config, 256)
    attackers: list[socket.socket] = []
    try:
        where = address(daemon)
        assert "max_connections 192" in daemon.wait_log("limits: ")
        host = f"127.0.0.1:{where[1]}"
        # 300 connections: heads that never end, and bodies that trickle
        for n in range(300):
            sock = socket.create_connection(where, timeout=STARTUP_TIMEOUT)
            if n % 2:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
            else:
                sock.sendall(
                    f"POST /v1/ledgers/main/records HTTP/1.1\r\nHost: {host}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
                )
            attackers.append(sock)
        for _ in range(3):  # the attackers keep trickling; probes still get answers
            for sock in attackers:
                with contextlib.suppress(OSError):  # shed by the daemon: expected
                    sock.send(b"a")
            for _ in range(5):
                status, _, body = parse(exchange(where, get("/healthz", host=host)))
                assert status == 200, body
            status, _, body = parse(
                exchange(
                    where, post("/v1/ledgers/main/records", b'{"kind":"k","payload":1}', host=host)
                )
            )
            assert status == 201, body
        overloads = [line for line in daemon.lines if "max_connections=192 reached" in line]
        assert 1 <= len(overloads) <= 2, overloads  # once per 10 s, not per connection
        assert "Traceback" not in daemon.log
        assert "EMFILE" not in daemon.log
        assert "Too many open files" not in daemon.log
    finally:
        for sock in attackers:
            sock.close()
        daemon.close()


# -- SIGTERM under keep-alive load -----------------------------------------------------------
LOADED = """
graceful_timeout = 60.0
[[ledgers]]
id = "main"
storage = "main.db"
durability = "normal"
"""


class Writer(threading.Thread):
    """A keep-alive client appending unique records until the daemon goes away."""

    def __init__(self, where: tuple[str, int], index: int, started: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.where = where
        self.index = index
        self.started = started
        self.answered: dict[str, int] = {}  # request id -> status
        self.receipts: dict[str, int] = {}  # request id -> seq
        self.unanswered: list[str] = []  # sent, no response

    def run(self) -> None:
        host = f"127.0.0.1:{self.where[1]}"
        sock = socket.create_connection(self.where, timeout=60)
        buffer = b""
        self.started.wait()
        n = 0
        while True:
            rid = f"w{self.index}-{n}"
            n += 1
            body = json.dumps({"kind": "load", "payload": {"rid": rid}}).encode()
            try:
                sock.sendall(post("/v1/ledgers/main/records", body, host=host))
            except OSError:
                self.unanswered.append(rid)
                break
            response, buffer = self._read(sock, buffer)
            if response is None:
                self.unanswered.append(rid)
                break
            status, headers, reply = response
            self.answered[rid] = status
            if status == 201:
                self.receipts[rid] = json.loads(reply)["seq"]
            if headers.get("connection") == "close":
                sock.close()
                try:
                    sock = socket.create_connection(self.where, timeout=60)
                except OSError:
                    break
                buffer = b""
        sock.close()

    @staticmethod
    def _read(
        sock: socket.socket, buffer: bytes
    ) -> tuple[tuple[int, dict[str, str], bytes] | None, bytes]:
        while b"\r\n\r\n" not in buffer:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return None, b""
            if not chunk:
                return None, b""
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        status, headers, _ = parse(head + b"\r\n\r\n")
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return None, b""
            if not chunk:
                return None, b""
            rest += chunk
        return (status, headers, rest[:length]), rest[length:]


def test_sigterm_under_64_keep_alive_writers_answers_every_committed_append(
    tmp_path: Path,
) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(LOADED)
    daemon = DaemonProcess(config)
    try:
        where = address(daemon)
        barrier = threading.Barrier(65)
        writers = [Writer(where, i, barrier) for i in range(64)]
        for writer in writers:
            writer.start()
        barrier.wait()
        deadline = time.monotonic() + 60
        while sum(len(w.receipts) for w in writers) < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.send(signal.SIGTERM)
        try:
            assert daemon.wait() == 0, daemon.log
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit after SIGTERM:\n{daemon.log}") from None
        for writer in writers:
            writer.join(60)
    finally:
        daemon.close()
    stored = read_ledger(tmp_path / "main.db")
    receipts = {rid: seq for w in writers for rid, seq in w.receipts.items()}
    unanswered = [rid for w in writers for rid in w.unanswered]
    refused = [rid for w in writers for rid, status in w.answered.items() if status != 201]
    assert len(receipts) >= 500
    # every acknowledged append is stored at its seq
    assert all(stored.get(rid) == seq for rid, seq in receipts.items())
    # every append without an answer, or refused, was not committed
    assert [rid for rid in unanswered + refused if rid in stored] == []
    # nothing committed without its client knowing
    assert set(stored) == set(receipts)
    assert {w.answered[rid] for w in writers for rid in w.answered} <= {201, 503}
    assert "graceful_timeout" not in daemon.log  # bounded by the work, not the timeout
    assert "Traceback" not in daemon.log


def read_ledger(path: Path) -> dict[str, int]:
    """rid -> seq of every stored entry (read with the public storage API)."""
    import trio

    from nucleus_actors import LedgerConfig, open_ledger
    from nucleus_actors.storage import SQLiteStorage

    out: dict[str, int] = {}

    async def read() -> None:
        async with open_ledger(
            LedgerConfig(ledger_id="main"), storage=SQLiteStorage(path)
        ) as engine:
            async for entry in engine.read(0, engine.state.length):
                out[entry.record.payload["rid"]] = entry.seq

    trio.run(read)
    return out


# -- verify_on_open --------------------------------------------------------------------------
def tampered_ledger(directory: Path) -> None:
    """A 200-entry ledger `main` whose entry 100 was altered on disk (its tail is intact)."""
    import sqlite3

    import trio

    from nucleus_actors import LedgerConfig, Record, open_ledger
    from nucleus_actors.storage import SQLiteStorage

    async def fill() -> None:
        storage = SQLiteStorage(directory / "main.db")
        async with open_ledger(LedgerConfig(ledger_id="main"), storage=storage) as engine:
            await engine.append_many([Record("k", {"n": n}) for n in range(200)])

    trio.run(fill)
    with sqlite3.connect(directory / "main.db") as db:
        db.execute(
            "UPDATE entries SET canonical = replace(canonical, '\"n\":100', '\"n\":101') "
            "WHERE seq = 100"
        )


@pytest.mark.parametrize("mode", ["tail", "full"])
def test_verify_on_open_finds_a_tampered_middle_entry(tmp_path: Path, mode: str) -> None:
    tampered_ledger(tmp_path)
    config = tmp_path / "nucleus.toml"
    config.write_text(f'[[ledgers]]\nid = "main"\nstorage = "main.db"\nverify_on_open = "{mode}"\n')
    daemon = DaemonProcess(config)
    try:
        if mode == "full":
            assert daemon.wait() == 1
            assert "entry 100" in daemon.log or "seq 100" in daemon.log, daemon.log
            return
        where = address(daemon)
        line = daemon.wait_log("background verification failed")
        assert "100" in line
        status, _, body = parse(exchange(where, get("/metrics", host=f"localhost:{where[1]}")))
        assert status == 200
        text = body.decode()
        assert 'nucleus_ledger_verify_failed{ledger="main"} 1.0' in text
        assert 'nucleus_ledger_verified_entries{ledger="main"} 0.0' in text
    finally:
        daemon.close()
