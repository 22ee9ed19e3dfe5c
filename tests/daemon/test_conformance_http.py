"""The HTTP contract against its references: I-JSON bodies, the number domain, 405 + Allow."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from nucleus_actors import LedgerConfig, open_ledger

from .conftest import app_client, serving_main

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    async with (
        open_ledger(LedgerConfig(ledger_id="main")) as engine,
        app_client(serving_main(engine)) as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("path", "body", "key"),
    [
        ("records", '{"kind":"k","payload":{"a":1,"a":2}}', "a"),
        ("records", '{"kind":"k","kind":"j","payload":1}', "kind"),
        ("records", '{"kind":"k","payload":[{"x":{"é":1,"é":1}}]}', "é"),
        ("records", '{"kind":"k","payload":1,"meta":{"t":"1","t":"2"}}', "t"),
        ("records/batch", '{"records":[{"kind":"k","payload":{"b":1,"b":1}}]}', "b"),
    ],
)
async def test_duplicate_member_names_are_refused_naming_the_key(
    api: httpx.AsyncClient, path: str, body: str, key: str
) -> None:
    response = await api.post(f"/v1/ledgers/main/{path}", content=body.encode(), headers=JSON)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["key"] == key
    assert "more than once" in problem["detail"]
    assert (await api.get("/v1/ledgers/main/head")).json()["length"] == 0


@pytest.mark.parametrize("literal", ["1e16", "10000000000000000.0", "1E20", "9007199254740992"])
async def test_unsafe_whole_numbers_are_refused_with_a_hint(
    api: httpx.AsyncClient, literal: str
) -> None:
    body = f'{{"kind":"k","payload":{{"n":{literal}}}}}'.encode()
    response = await api.post("/v1/ledgers/main/records", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert "send it as a string" in response.json()["detail"]


async def test_what_get_returns_can_be_posted_again(api: httpx.AsyncClient) -> None:
    body = b'{"kind":"k","payload":{"f":56.0,"big":1e21,"tiny":5e-324,"neg":-0.0}}'
    created = await api.post("/v1/ledgers/main/records", content=body, headers=JSON)
    assert created.status_code == 201, created.text
    entry = (await api.get("/v1/ledgers/main/records/0")).json()
    again = {"kind": entry["kind"], "payload": entry["payload"], "meta": entry["meta"]}
    reposted = await api.post("/v1/ledgers/main/records", json=again)
    assert reposted.status_code == 201, reposted.text


async def test_a_lone_surrogate_key_is_a_422_with_a_printable_detail(
    api: httpx.AsyncClient,
) -> None:
    body = b'{"kind":"k","payload":{"\\ud800":1}}'
    response = await api.post("/v1/ledgers/main/records", content=body, headers=JSON)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].isprintable()


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/ledgers/main/head", "GET"),
        ("PUT", "/v1/ledgers/main/records", "GET, POST"),
        ("DELETE", "/v1/ledgers/main/records/0", "GET"),
        # .../records/batch also matches GET .../records/{seq}: the literal path wins.
        ("PATCH", "/v1/ledgers/main/records/batch", "POST"),
        ("GET", "/v1/ledgers/main/records/batch", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_unlisted_methods_get_405_with_a_matching_allow(
    api: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    # No Content-Type: the body check must not answer 415 before routing answers 405.
    response = await api.request(method, path, content=b"x")
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == allow
    assert response.json()["status"] == 405
