"""The single-append fast path answers exactly what the FastAPI route answers."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from nucleus_actors import LedgerConfig, ModuleSpec, Record, open_ledger
from nucleus_actors.daemon import fastpath
from nucleus_actors.daemon.modules import RequireFields

from .conftest import app_client, serving_main

DUPLICATE = b'{"kind": "x", "kind": "y", "payload": 1}'
BODIES: list[Any] = [
    b'{"kind": "order.created", "payload": {"customer": "c", "n": 1}}',
    b'{"kind": "order.created", "payload": {"customer": "c"}, "meta": {"a": "b"}}',
    b'{"kind": "x", "payload": null}',
    b'{"kind": "order.created", "payload": {"n": 1}}',  # vetoed by RequireFields: 409
    b'{"kind": "x", "payload": 1, "extra": 2}',  # extra member: 422
    b'{"kind": 5, "payload": 1}',  # kind not a string: 422 (strict)
    b'{"kind": "x"}',  # no payload: 422
    b'{"kind": "x", "payload": 1, "meta": {"a": 1}}',  # meta value not a string: 422
    b'{"kind": "x", "payload": 1, "meta": []}',
    b'{"kind": "bad kind", "payload": 1}',  # Record refuses the kind: 422
    b'{"kind": "x", "payload": 9007199254740993}',  # over 2**53: 422
    b'{"kind": "x", "payload": NaN}',
    b"[1, 2]",
    b'"text"',
    b'{"kind": "x", "payload": ',  # malformed: 400
    b'{"kind": "x", "payload": 1} trailing',
    b"\xff\xfe",
    b"[" * 5000 + b"]" * 5000,  # nesting deeper than the parser allows
    DUPLICATE,  # the route's parser decides (I-JSON refuses it where _jcs.loads exists)
]


def _comparable(response: httpx.Response) -> tuple[int, str | None, Any]:
    body = response.json()
    if isinstance(body, dict):
        for volatile in ("seq", "hash", "timestamp"):
            body.pop(volatile, None)
    location = response.headers.get("location")
    return response.status_code, response.headers.get("content-type"), (body, location is None)


async def _answers(bodies: list[bytes], *, fast: bool) -> list[tuple[int, str | None, Any]]:
    spec = ModuleSpec(RequireFields(), config={"kinds": ["order."], "fields": ["customer"]})
    out = []
    async with (
        open_ledger(LedgerConfig(ledger_id="main"), modules=[spec]) as engine,
        app_client(serving_main(engine)) as api,
    ):
        for body in bodies:
            response = await api.post(
                "/v1/ledgers/main/records",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            out.append(_comparable(response))
    return out


async def test_the_fast_path_answers_as_the_route_does(monkeypatch: pytest.MonkeyPatch) -> None:
    hits: list[bytes] = []
    parse = fastpath.parse_record

    def counting(body: bytes) -> Record | None:
        record = parse(body)
        if record is not None:
            hits.append(body)
        return record

    with monkeypatch.context() as patch:
        patch.setattr(fastpath, "parse_record", counting)
        fast = await _answers(BODIES, fast=True)
    with monkeypatch.context() as patch:
        patch.setattr(fastpath, "parse_record", lambda body: None)
        slow = await _answers(BODIES, fast=False)
    for body, a, b in zip(BODIES, fast, slow, strict=True):
        assert a == b, body[:80]
    # the valid records (and the vetoed one) went the fast way; nothing else did
    assert hits[:4] == BODIES[:4]
    assert set(hits[4:]) <= {DUPLICATE}
    assert [status for status, _, _ in fast[:4]] == [201, 201, 201, 409]


async def test_unknown_ledger_and_idempotency_key_go_to_the_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(fastpath, "parse_record", lambda body: calls.append(body))
    async with (
        open_ledger(LedgerConfig(ledger_id="main")) as engine,
        app_client(serving_main(engine)) as api,
    ):
        record = {"kind": "x", "payload": 1}
        response = await api.post("/v1/ledgers/other/records", json=record)
        assert response.status_code == 404
        assert json.loads(response.content)["type"].endswith("/unknown-ledger")
        response = await api.post(
            "/v1/ledgers/main/records", json=record, headers={"Idempotency-Key": "k1"}
        )
        assert response.status_code in (201, 422)
    assert calls == []
