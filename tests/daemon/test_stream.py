"""`POST /v1/ledgers/{id}/records/stream`: NDJSON in, NDJSON receipts out, full duplex."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from typer.testing import CliRunner

from nucleus_actors import LedgerConfig, ModuleSpec, Record, open_ledger
from nucleus_actors.cli import app as cli_app
from nucleus_actors.daemon import stream as stream_module
from nucleus_actors.daemon.modules import RequireFields
from nucleus_actors.storage import MemoryStorage
from tests.daemon.conftest import DaemonProcess, app_client, serving_main

NDJSON = {"Content-Type": "application/x-ndjson"}


def lines_of(*records: Any) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records
    )


@asynccontextmanager
async def _app(
    storage: MemoryStorage | None = None, *, token: str | None = None, limit: int = 1 << 20
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    spec = ModuleSpec(RequireFields(), config={"kinds": ["order."], "fields": ["customer"]})
    async with (
        open_ledger(LedgerConfig(ledger_id="main"), storage=storage, modules=[spec]) as engine,
        app_client(serving_main(engine, token=token, max_body_bytes=limit)) as api,
    ):
        yield api, engine


@pytest.fixture
async def api() -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    async with _app() as pair:
        yield pair


def answer_lines(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


async def test_receipts_in_order_bad_lines_and_vetoes_do_not_stop_the_stream(
    api: tuple[httpx.AsyncClient, Any],
) -> None:
    client, engine = api
    body = lines_of(
        {"kind": "order.created", "payload": {"customer": "a"}},
        b'{"kind": "x", "payload": ',  # line 2: not JSON
        b"",  # line 3: blank, skipped
        {"kind": "order.created", "payload": {"id": 1}},  # line 4: vetoed (no customer)
        {"kind": "x", "payload": 1, "extra": 1},  # line 5: not a record object
        {"kind": "bad kind", "payload": 1},  # line 6: invalid kind
        {"kind": "note", "payload": "last"},
    ).rstrip(b"\n")  # the last line needs no newline
    response = await client.post("/v1/ledgers/main/records/stream", content=body, headers=NDJSON)
    answers = answer_lines(response)
    assert [a.get("line") for a in answers] == [1, 2, 4, 5, 6, 7, None]
    assert (answers[0]["seq"], answers[-2]["seq"]) == (0, 1)
    assert answers[1]["type"].endswith("/malformed-json")
    assert answers[1]["status"] == 400
    assert answers[2]["type"].endswith("/record-rejected")
    assert answers[2]["module"] == "require-fields"
    assert answers[3]["type"].endswith("/invalid-request")
    assert answers[3]["errors"][0]["path"] == "extra"
    assert answers[4]["type"].endswith("/invalid-record")
    assert answers[-1] == {"summary": {"appended": 2, "failed": 4}}
    stored = [entry async for entry in engine.read()]
    assert [(e.seq, e.hash.hex()) for e in stored] == [
        (a["seq"], a["hash"]) for a in answers if "seq" in a
    ]


async def test_guards_token_media_type_and_unknown_ledger() -> None:
    async with _app(token="s3cret") as (client, _):
        path = "/v1/ledgers/main/records/stream"
        body = lines_of({"kind": "k", "payload": 1})
        response = await client.post(path, content=body, headers=NDJSON)
        assert response.status_code == 401
        auth = {**NDJSON, "Authorization": "Bearer s3cret"}
        response = await client.post(
            path, content=body, headers={**auth, "Content-Type": "application/json"}
        )
        assert response.status_code == 415
        assert "application/x-ndjson" in response.json()["detail"]
        response = await client.post("/v1/ledgers/nope/records/stream", content=body, headers=auth)
        assert response.status_code == 404
        response = await client.post(path, content=body, headers=auth)
        assert answer_lines(response)[-1] == {"summary": {"appended": 1, "failed": 0}}


async def test_a_line_over_the_limit_is_refused_and_skipped() -> None:
    async with _app(limit=2048) as (client, engine):
        big = {"kind": "k", "payload": "x" * 5000}
        body = lines_of({"kind": "k", "payload": 1}, big, {"kind": "k", "payload": 3})

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(body), 700):
                yield body[start : start + 700]

        response = await client.post(
            "/v1/ledgers/main/records/stream", content=chunks(), headers=NDJSON
        )
        answers = answer_lines(response)
        assert [a.get("line") for a in answers] == [1, 2, 3, None]
        assert answers[1]["type"].endswith("/body-too-large")
        assert [e.record.payload async for e in engine.read()] == [1, 3]


class GatedStorage(MemoryStorage):
    """Holds every append until the test opens the gate; counts commits."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.commits = 0

    async def append(self, entries):  # type: ignore[no-untyped-def]
        await self.gate.wait()
        await super().append(entries)
        self.commits += 1


async def test_no_receipt_before_the_record_is_stored() -> None:
    storage = GatedStorage()
    async with _app(storage) as (client, engine):
        sent = trio.Event()
        got: list[bytes] = []

        async def body() -> AsyncIterator[bytes]:
            yield lines_of({"kind": "k", "payload": 1})
            sent.set()

        async def post() -> None:
            async with client.stream(
                "POST", "/v1/ledgers/main/records/stream", content=body(), headers=NDJSON
            ) as response:
                async for chunk in response.aiter_bytes():
                    got.append(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post)
            await sent.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert storage.commits == 0
            assert engine.state.length == 0
            assert b"seq" not in b"".join(got)
            storage.gate.set()
        assert b'"seq":0' in b"".join(got)


# -- a real daemon: full duplex and a client that goes away ----------------------------------
CONFIG = """
[[ledgers]]
id = "main"
storage = "main.db"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    directory = tmp_path_factory.mktemp("stream")
    (directory / "nucleus.toml").write_text(CONFIG)
    proc = DaemonProcess(directory / "nucleus.toml")
    try:
        proc.wait_listening()
        yield proc
        assert proc.stop() == 0, proc.log
    finally:
        proc.close()


def _open(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        b"POST /v1/ledgers/main/records/stream HTTP/1.1\r\nHost: %s:%s\r\n"
        % (host.encode(), port.encode())
        + b""
        b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    return sock


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _read_until(sock: socket.socket, needle: bytes, buffer: bytearray) -> None:
    deadline = time.monotonic() + 30
    while needle not in buffer:
        assert time.monotonic() < deadline, bytes(buffer)
        data = sock.recv(65536)
        assert data, bytes(buffer)
        buffer += data


def _head(url: str) -> int:
    return int(httpx.get(f"{url}/v1/ledgers/main/head").json()["length"])


def test_full_duplex_receipts_arrive_while_the_body_is_still_open(
    daemon: DaemonProcess,
) -> None:
    url = daemon.wait_listening()
    start = _head(url)
    sock = _open(url)
    buffer = bytearray()
    with sock:
        for n in range(3):
            sock.sendall(_chunk(lines_of({"kind": "k", "payload": n})))
            # the answer to line n comes back before line n + 1 is sent
            _read_until(sock, b'"line":%d,"seq":%d' % (n + 1, start + n), buffer)
        sock.sendall(b"0\r\n\r\n")
        _read_until(sock, b'{"summary": {"appended": 3, "failed": 0}}', buffer)


def test_a_client_that_disconnects_loses_nothing_acknowledged(daemon: DaemonProcess) -> None:
    url = daemon.wait_listening()
    start = _head(url)
    sock = _open(url)
    buffer = bytearray()
    acknowledged = []
    with sock:
        sock.sendall(_chunk(lines_of(*({"kind": "k", "payload": n} for n in range(50)))))
        _read_until(sock, b'"line":50,', buffer)
        # half a line, then the connection drops
        sock.sendall(_chunk(b'{"kind": "k", "payl'))
        for line in bytes(buffer).split(b"\n"):
            if line.startswith(b'{"line"'):
                acknowledged.append(json.loads(line))
    time.sleep(0.5)  # let the daemon notice; nothing more may be stored
    stored = httpx.get(
        f"{url}/v1/ledgers/main/records", params={"start": start, "limit": 1000}
    ).json()["entries"]
    assert [e["seq"] for e in stored] == [a["seq"] for a in acknowledged]
    assert [e["payload"] for e in stored] == list(range(50))
    assert [e["hash"] for e in stored] == [a["hash"] for a in acknowledged]
    # the daemon still serves streams
    sock = _open(url)
    buffer = bytearray()
    with sock:
        sock.sendall(_chunk(lines_of({"kind": "k", "payload": "after"})) + b"0\r\n\r\n")
        _read_until(sock, b'"summary"', buffer)


async def test_the_stream_appends_records_as_append_would() -> None:
    # the in-process comparison the benchmark makes: same records, same canonical bytes
    async with _app() as (client, engine):
        body = lines_of({"kind": "note", "payload": {"b": 1, "a": [1, 2]}, "meta": {"m": "v"}})
        response = await client.post(
            "/v1/ledgers/main/records/stream", content=body, headers=NDJSON
        )
        answer_lines(response)
        entry = await engine.get(0)
        expected = Record("note", {"b": 1, "a": [1, 2]}, {"m": "v"})
        assert entry.record.payload == expected.payload
        assert entry.record.meta == expected.meta


def test_the_group_size_is_the_pipeline_batch() -> None:
    assert LedgerConfig(ledger_id="x").max_batch == stream_module.GROUP


def test_nucleus_append_streams_records_larger_than_a_request_body(
    daemon: DaemonProcess,
) -> None:
    # five 900 KB records: 4.5 MB, over the daemon's max_body_bytes (4 MiB) taken together;
    # the count-based batches `nucleus append` used to send failed on them
    url = daemon.wait_listening()
    before = _head(url)
    text = "".join(json.dumps({"n": n, "blob": "x" * 900_000}) + "\n" for n in range(5))
    result = CliRunner().invoke(
        cli_app, ["append", "-k", "blob"], input=text, env={"NUCLEUS_URL": url}
    )
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3, 4, 5]
    assert [a["seq"] for a in answers] == list(range(before, before + 5))
    assert _head(url) == before + 5
    assert "appended 5 record(s) to 'main'" in result.stderr


# -- per-line idempotency keys ----------------------------------------------------------------
async def test_keyed_lines_replay_their_first_receipt_and_refuse_a_reuse_or_a_bad_key() -> None:
    async with _app() as (client, engine):
        first = [{"kind": "k", "payload": n, "idempotency_key": f"run-1/{n}"} for n in range(3)]
        body = lines_of(*first, {"kind": "plain", "payload": "no key"})
        answers = answer_lines(
            await client.post("/v1/ledgers/main/records/stream", content=body, headers=NDJSON)
        )
        assert [a["seq"] for a in answers[:4]] == [0, 1, 2, 3]
        assert not any("replayed" in a for a in answers[:4])
        assert answers[-1] == {"summary": {"appended": 4, "failed": 0}}
        stored = await engine.get(1)
        assert stored.record.payload == 1
        assert stored.record.kind == "k"  # the key is not part of the record

        again = lines_of(
            first[1],  # a replay: the first receipt, nothing appended
            {"kind": "k", "payload": "other", "idempotency_key": "run-1/2"},  # reused: 422
            {"kind": "k", "payload": 9, "idempotency_key": "new/1"},
            {"kind": "k", "payload": 9, "idempotency_key": "new/1"},  # in flight: 409
            {"kind": "k", "payload": 1, "idempotency_key": "bad key"},  # not a key: 400
            {"kind": "k", "payload": 1, "idempotency_key": 7},
            {"kind": "bad kind", "payload": 1, "idempotency_key": "run-2/1"},  # invalid record
        )
        answers = answer_lines(
            await client.post("/v1/ledgers/main/records/stream", content=again, headers=NDJSON)
        )
        replay = answers[0]
        assert replay["replayed"] is True
        assert (replay["line"], replay["seq"], replay["hash"]) == (1, 1, stored.hash.hex())
        assert replay["timestamp"] == stored.timestamp
        assert answers[1]["line"] == 2
        assert answers[1]["status"] == 422
        assert answers[1]["type"].endswith("/idempotency-key-reused")
        assert answers[2]["seq"] == 4
        assert answers[3]["status"] == 409
        assert answers[3]["type"].endswith("/idempotency-key-in-flight")
        assert [answers[n]["status"] for n in (4, 5)] == [400, 400]
        assert "idempotency_key must be" in answers[4]["detail"]
        assert answers[6]["status"] == 422
        assert answers[6]["type"].endswith("/invalid-record")
        assert answers[-1] == {"summary": {"appended": 1, "failed": 5, "replayed": 1}}
        assert engine.state.length == 5


def test_a_cut_stream_resent_with_the_same_keys_appends_every_record_exactly_once(
    daemon: DaemonProcess,
) -> None:
    url = daemon.wait_listening()
    start = _head(url)
    records = [{"kind": "k", "payload": n, "idempotency_key": f"cut/{n}"} for n in range(200)]
    sock = _open(url)
    buffer = bytearray()
    with sock:
        sock.sendall(_chunk(lines_of(*records[:120])))
        _read_until(sock, b'"line":60,', buffer)  # some acknowledged, maybe not all 120
        sock.sendall(_chunk(b'{"kind": "k", "payl'))  # then the connection drops mid-line
    time.sleep(0.5)  # let the daemon notice
    sock = _open(url)
    buffer = bytearray()
    with sock:
        sock.sendall(_chunk(lines_of(*records)) + b"0\r\n\r\n")
        _read_until(sock, b'"summary"', buffer)
    answers = [json.loads(line) for line in bytes(buffer).split(b"\n") if line.startswith(b"{")]
    receipts = [a for a in answers if "seq" in a]
    assert len(receipts) == 200, answers[-3:]
    replayed = sum(1 for a in receipts if a.get("replayed"))
    assert 60 <= replayed <= 120
    summary = answers[-1]["summary"]
    assert summary == {"appended": 200 - replayed, "failed": 0, "replayed": replayed}
    stored = httpx.get(
        f"{url}/v1/ledgers/main/records", params={"start": start, "limit": 1000}
    ).json()["entries"]
    assert sorted(e["payload"] for e in stored) == list(range(200))  # each exactly once
    by_seq = {e["seq"]: e for e in stored}
    for receipt in receipts:
        assert by_seq[receipt["seq"]]["payload"] == receipt["line"] - 1
        assert by_seq[receipt["seq"]]["hash"] == receipt["hash"]


def test_nucleus_append_with_an_idempotency_prefix_resumes_without_duplicates(
    daemon: DaemonProcess,
) -> None:
    url = daemon.wait_listening()
    before = _head(url)
    lines = "".join(json.dumps({"n": n}) + "\n" for n in range(30))
    args = ["append", "-k", "resume.test", "--idempotency-prefix", "import-7/"]
    env = {"NUCLEUS_URL": url}
    # a first run cut after 10 lines, then the whole input again
    first = CliRunner().invoke(cli_app, args, input=lines[: lines.index('{"n": 10}')], env=env)
    assert first.exit_code == 0, first.output
    assert _head(url) == before + 10
    again = CliRunner().invoke(cli_app, args, input=lines, env=env)
    assert again.exit_code == 0, again.output
    answers = [json.loads(line) for line in again.stdout.splitlines()]
    assert [a.get("replayed", False) for a in answers] == [True] * 10 + [False] * 20
    assert "10 of them appended by an earlier run (replayed)" in again.stderr
    assert _head(url) == before + 30
    stored = httpx.get(
        f"{url}/v1/ledgers/main/records", params={"start": before, "limit": 100}
    ).json()["entries"]
    assert [e["payload"]["n"] for e in stored] == list(range(30))
    bad = CliRunner().invoke(cli_app, [*args[:3], "--idempotency-prefix", "a b"], input=lines)
    assert bad.exit_code != 0
    assert "--idempotency-prefix must be" in bad.stderr
