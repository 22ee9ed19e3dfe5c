"""The daemon's guards in process: Host check, request ids, admission (stopping, body deadline,
byte budget), batch cap, and errors that used to be 500 (issue 15, sections 2, 4-7)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing

from nucleus_actors import Hash, LedgerConfig, Record, open_ledger
from nucleus_actors.daemon import DaemonState, create_app, parse_config
from nucleus_actors.daemon.guards import (
    ByteBudget,
    HostAllowList,
    HttpLimits,
    RateLimitedLog,
    valid_request_id,
)
from nucleus_actors.module import Module, ModuleSpec, Overflow

from .conftest import app_client, serving_main

PROBLEM = "application/problem+json"


@asynccontextmanager
async def api(
    limits: HttpLimits | None = None, *, allowed: HostAllowList | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, DaemonState, Any]]:
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        state = serving_main(engine, limits=limits)
        state.allowed_hosts = allowed
        app = create_app(state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8470") as c:
            yield c, state, app


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/" + slug), body
    assert body["status"] == status
    return body


# -- Host (DNS rebinding) --------------------------------------------------------------------
def test_default_allowed_hosts_are_loopback_names_and_the_bind_address_with_the_port() -> None:
    allowed = HostAllowList.defaults("127.0.0.1", 8470)
    assert allowed.entries == ("127.0.0.1:8470", "localhost:8470", "[::1]:8470")
    assert allowed.allows("localhost:8470")
    assert allowed.allows("LOCALHOST:8470")
    assert allowed.allows("[::1]:8470")
    assert not allowed.allows("localhost:8471")
    assert not allowed.allows("attacker.example:8470")
    assert not allowed.allows("localhost")  # port 80
    assert allowed.allows("localhost:x") is None
    assert allowed.allows("[::1") is None
    assert HostAllowList.defaults("10.0.0.5", 80).allows("10.0.0.5")  # port 80 implied
    assert HostAllowList.defaults("::1", 9).entries == ("[::1]:9", "localhost:9", "127.0.0.1:9")
    assert HostAllowList.defaults("0.0.0.0", 9).entries[0] == "localhost:9"
    bare = HostAllowList(["Example.COM", "api.example.com:443"])
    assert bare.allows("example.com:1234")
    assert bare.allows("api.example.com", tls=True)
    assert not bare.allows("api.example.com")
    assert HostAllowList(["*"]).allows("anything:1")
    with pytest.raises(ValueError, match="allowed_hosts entry 'a:b:c'"):
        HostAllowList(["a:b:c"])


async def test_a_foreign_host_gets_421_for_reads_and_writes_and_health_stays_open() -> None:
    async with api(allowed=HostAllowList.defaults("127.0.0.1", 8470)) as (client, _, _):
        record = {"kind": "k", "payload": 1}
        ok = await client.post("/v1/ledgers/main/records", json=record)
        assert ok.status_code == 201
        evil = {"Host": "attacker.example:8470"}
        body = problem(
            await client.post("/v1/ledgers/main/records", json=record, headers=evil),
            421,
            "misdirected-request",
        )
        assert body["host"] == "attacker.example:8470"
        problem(
            await client.get("/v1/ledgers/main/records", headers=evil), 421, "misdirected-request"
        )
        problem(await client.get("/v1/ledgers", headers={"Host": "a b"}), 400, "bad-request")
        assert (await client.get("/healthz", headers=evil)).status_code == 200
        assert (await client.get("/v1/ledgers/main/head")).json()["length"] == 1


def test_allowed_hosts_entries_are_validated_in_the_config() -> None:
    from nucleus_actors.daemon import ConfigError

    with pytest.raises(ConfigError, match=r"allowed_hosts: allowed_hosts entry 'x:y'"):
        parse_config(
            {"allowed_hosts": ["x:y"], "ledgers": [{"id": "m", "storage": ":memory:"}]},
            base_dir=Path("."),
        )


# -- request ids -----------------------------------------------------------------------------
async def test_a_valid_request_id_is_echoed_and_an_invalid_one_replaced() -> None:
    async with api() as (client, _, _):
        given = (await client.get("/healthz", headers={"X-Request-Id": "abc-123"})).headers
        assert given["x-request-id"] == "abc-123"
        for bad in ["x" * 129, "a\tb"]:
            replaced = (await client.get("/healthz", headers={"X-Request-Id": bad})).headers
            assert replaced["x-request-id"] != bad
            assert valid_request_id(replaced["x-request-id"])
        made = (await client.get("/v1/ledgers/nope")).headers["x-request-id"]
        assert len(made) == 32
    assert valid_request_id("x" * 128)
    assert not valid_request_id("")
    assert not valid_request_id("é")


# -- errors that were 500 --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/ledgers/main/records", '{"kind": "k", "payload": {"\\ud800": 1}}'),
        ("/v1/ledgers/main/records", '{"kind": "k", "payload": 1, "meta": {"\\udfff": "v"}}'),
        (
            "/v1/ledgers/main/records/batch",
            '{"records": [{"kind": "k", "payload": {"\\ud83d": 0}}]}',
        ),
    ],
)
async def test_a_lone_surrogate_in_a_key_is_422(path: str, body: str) -> None:
    async with api() as (client, _, _):
        response = await client.post(
            path, content=body, headers={"Content-Type": "application/json"}
        )
        detail = problem(response, 422, "invalid-record")["detail"]
        assert "\\ud" in detail  # spelled out, not raw
        assert (await client.get("/v1/ledgers/main/head")).json()["length"] == 0


@pytest.mark.parametrize("value", ["²", "1" * 5000, "¹2", "-1", "99999999999999999999"])
async def test_a_bad_last_event_id_is_422(value: str) -> None:
    async with api() as (client, _, _):
        response = await client.get(
            "/v1/ledgers/main/stream", headers={"Last-Event-ID": value.encode("latin-1")}
        )
        problem(response, 422, "invalid-request")


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=abc",
        "application/openmetrics-text; version=1.0.0",
        "text/plain",
    ],
)
async def test_metrics_answers_any_accept_header(accept: str) -> None:
    async with api() as (client, _, _):
        response = await client.get("/metrics", headers={"Accept": accept})
        assert response.status_code == 200
        assert "nucleus" in response.text


async def test_a_batch_over_max_batch_records_is_413() -> None:
    async with api(HttpLimits(max_batch_records=3)) as (client, _, _):
        records = [{"kind": "k", "payload": n} for n in range(4)]
        response = await client.post("/v1/ledgers/main/records/batch", json={"records": records})
        assert problem(response, 413, "batch-too-large")["limit"] == 3
        response = await client.post(
            "/v1/ledgers/main/records/batch", json={"records": records[:3]}
        )
        assert response.status_code == 201


# -- admission -------------------------------------------------------------------------------
async def test_once_stopping_a_write_gets_503_with_connection_close_and_reads_still_answer() -> (
    None
):
    async with api() as (client, state, _):
        state.begin_stopping()
        response = await client.post("/v1/ledgers/main/records", json={"kind": "k", "payload": 1})
        problem(response, 503, "daemon-stopping")
        assert response.headers["connection"] == "close"
        assert response.headers["retry-after"] == "1"
        read = await client.get("/v1/ledgers/main/head")
        assert read.status_code == 200
        assert read.headers["connection"] == "close"
        assert read.json()["length"] == 0


async def call(app: Any, scope: dict[str, Any], receive: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def post_scope(length: int, path: str = "/v1/ledgers/main/records") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"localhost:8470"),
            (b"content-type", b"application/json"),
            (b"content-length", str(length).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8470),
        "state": {},
    }


def answer(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], dict[str, Any]]:
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, json.loads(body)


async def test_a_body_that_trickles_past_read_timeout_gets_408_and_nothing_is_appended(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with api(HttpLimits(read_timeout=5.0)) as (_client, state, app):
        chunks = [b'{"kind": "k", ', b'"payload"', b": 1}"]

        async def receive() -> dict[str, Any]:
            if not chunks:
                await trio.sleep_forever()
            await trio.sleep(2.0)  # one chunk every 2 s: each read is quick, the total is not
            return {"type": "http.request", "body": chunks.pop(0), "more_body": True}

        start = trio.current_time()
        status, headers, body = answer(await call(app, post_scope(32), receive))
        assert status == 408
        assert body["type"].endswith("/request-timeout")
        assert headers["connection"] == "close"
        assert trio.current_time() - start == pytest.approx(5.0)
        assert engine_length(state) == 0


async def test_stopping_while_a_body_arrives_refuses_it(
    mock_clock: trio.testing.MockClock,
) -> None:
    async with api() as (_client, state, app):
        sent_first = trio.Event()

        async def receive() -> dict[str, Any]:
            if not sent_first.is_set():
                sent_first.set()
                return {"type": "http.request", "body": b'{"kind": "k",', "more_body": True}
            await trio.sleep_forever()
            raise AssertionError

        async with trio.open_nursery() as nursery:
            results: list[Any] = []

            async def run() -> None:
                results.append(await call(app, post_scope(64), receive))

            nursery.start_soon(run)
            await sent_first.wait()
            await trio.sleep(1)
            state.begin_stopping()
        status, headers, body = answer(results[0])
        assert status == 503
        assert body["type"].endswith("/daemon-stopping")
        assert headers["connection"] == "close"


async def test_large_bodies_share_the_byte_budget_then_get_503_after_read_timeout(
    mock_clock: trio.testing.MockClock,
) -> None:
    limits = HttpLimits(read_timeout=3.0, body_budget_bytes=100_000)
    async with api(limits) as (client, state, app):
        held = await state.budget.acquire(100_000)  # someone else's large body

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        status, _, body = answer(await call(app, post_scope(70_000), receive))
        assert status == 503
        assert body["type"].endswith("/server-busy")
        # a small body does not need the budget
        small = await client.post("/v1/ledgers/main/records", json={"kind": "k", "payload": 1})
        assert small.status_code == 201
        state.budget.release(held)
        assert state.budget.used == 0


async def test_byte_budget_is_first_come_first_served() -> None:
    budget = ByteBudget(10)
    order: list[str] = []
    first = await budget.acquire(8)
    async with trio.open_nursery() as nursery:

        async def take(name: str, size: int) -> None:
            got = await budget.acquire(size)
            order.append(name)
            await trio.lowlevel.checkpoint()
            budget.release(got)

        nursery.start_soon(take, "big", 10)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 1)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []  # small (it would fit) queues behind big
        budget.release(first)
    assert order == ["big", "small"]
    assert await budget.acquire(50) == 10  # clamped to the capacity


def test_rate_limited_log_reports_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("t"), 10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        assert limited.warning("overload %d", 1)
        for _ in range(50):
            assert not limited.warning("overload %d", 2)
        now[0] = 10.0
        assert limited.warning("overload %d", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "overload 1",
        "overload 3 (50 more since the last report)",
    ]


def engine_length(state: DaemonState) -> int:
    return state.hosts["main"].engine.state.length


# -- idempotency -----------------------------------------------------------------------------
async def test_idempotency_key_replays_refuses_a_different_body_and_checks_the_key() -> None:
    async with api() as (client, state, _):
        url = "/v1/ledgers/main/records"
        key = {"Idempotency-Key": "order-7"}
        first = await client.post(url, json={"kind": "k", "payload": 7}, headers=key)
        assert first.status_code == 201
        assert "idempotent-replayed" not in first.headers
        again = await client.post(url, json={"kind": "k", "payload": 7}, headers=key)
        assert again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json() == first.json()
        other = await client.post(url, json={"kind": "k", "payload": 8}, headers=key)
        assert problem(other, 422, "idempotency-key-reused")["key"] == "order-7"
        batch = {"records": [{"kind": "k", "payload": 1}, {"kind": "k", "payload": 2}]}
        bkey = {"Idempotency-Key": '"b-1"'}
        one = await client.post(url + "/batch", json=batch, headers=bkey)
        two = await client.post(url + "/batch", json=batch, headers=bkey)
        assert two.headers["idempotent-replayed"] == "true"
        assert one.json() == two.json()
        bad = await client.post(
            url, json={"kind": "k", "payload": 1}, headers={"Idempotency-Key": "a b"}
        )
        problem(bad, 422, "invalid-request")  # the OpenAPI pattern says which keys are valid
        assert engine_length(state) == 3


# -- readiness reports stuck appends ---------------------------------------------------------
class Hang(Module):
    id = "hang"

    async def after_append(self, record: Record, hash: Hash) -> None:
        await trio.sleep_forever()


async def test_readyz_reports_a_ledger_whose_appends_are_stuck(
    mock_clock: trio.testing.MockClock,
) -> None:
    spec = ModuleSpec(Hang, timeout=None, inbox=1, overflow=Overflow.BLOCK, shutdown=0)
    async with open_ledger(LedgerConfig(ledger_id="main"), modules=[spec]) as engine:
        state = serving_main(engine, limits=HttpLimits(stall_timeout=5))
        async with app_client(state, base_url="http://t") as client:
            assert (await client.get("/readyz")).status_code == 200
            async with trio.open_nursery() as nursery:
                for n in range(4):  # one in the module, one in its inbox, then appends wait
                    nursery.start_soon(engine.append, Record("k", n))
                await trio.sleep(4)
                assert engine.append_stalled_for() > 0
                assert (await client.get("/readyz")).status_code == 200
                await trio.sleep(2)
                body = problem(await client.get("/readyz"), 503, "not-ready")
                assert body["stalled"]["main"] > 5
                assert "stall_timeout=5" in body["detail"]
                nursery.cancel_scope.cancel()
