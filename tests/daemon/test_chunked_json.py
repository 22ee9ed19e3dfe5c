"""A large request body is parsed in slices (issue 15, section 5): same result and errors as a
whole-body parse, and other tasks (/healthz) run between the slices."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from nucleus_actors import LedgerConfig, _jcs, open_ledger
from nucleus_actors.daemon import chunked_json
from nucleus_actors.daemon.chunked_json import loads_chunked

from .conftest import app_client, serving_main

BIG = chunked_json.SMALL_BODY + 1


def _pad(text: str) -> bytes:
    """`text` with whitespace after it so that it is a large body (the chunked path)."""
    data = text.encode()
    return data + b" " * max(0, BIG - len(data))


def _records(n: int, pad: str = "") -> list[dict[str, Any]]:
    return [{"kind": "bench.item", "payload": {"t": pad, "n": i}} for i in range(n)]


GOOD = [
    json.dumps({"records": _records(3000)}),
    json.dumps({"a": 1, "records": _records(2000), "b": [], "c": {"d": [1, 2]}, "e": "x"}),
    json.dumps({"records": []}) + " " * BIG,
    " \t\r\n{ }" + " " * BIG,
    '{"records" : [ 1 , 2 ,\n3 ] , "x" : [ ] }' + " " * BIG,
    json.dumps(_records(3000)),  # a top-level array: parsed whole
    '{"records": [1e999, -0.0, 1.5, 12345678901234567890, true, null]}' + " " * BIG,
    json.dumps({"records": [{"k": "\U0001f600 \u00e9"}] * 3000}, ensure_ascii=False),
    json.dumps({"records": [{"k": "\ud800"}] * 3000}),  # an escaped lone surrogate
]

BAD = [
    '{"records": [1, 2,]}',
    '{"records": [1 2]}',
    '{"records": [1, 2], "records": [3]}',  # duplicate top-level member
    '{"records": [{"kind": "a", "kind": "b"}]}',  # duplicate nested member
    '{"records": [1, 2]} trailing',
    '{"records": [1, 2]',
    '{"records" [1]}',
    "{records: []}",
    '{"a": 1,}',
    "[" * 100_000 + "]" * 100_000,
    '{"r": ' + "[" * 100_000 + "]" * 100_000 + "}",
]


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:  # the exception's type and message must match
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("text", GOOD + BAD, ids=range(len(GOOD) + len(BAD)))
async def test_same_result_or_error_as_a_whole_body_parse(text: str) -> None:
    body = _pad(text)
    expected = _outcome(lambda: _jcs.loads(body))
    try:
        got: tuple[str, Any] = ("ok", await loads_chunked(body, slice_seconds=0))
    except Exception as exc:
        got = (type(exc).__name__, str(exc))
    assert got == expected
    if text in BAD:
        assert expected[0] != "ok", text


@pytest.mark.parametrize("prefix", [b"\xef\xbb\xbf", b""])
async def test_encodings_as_json_loads(prefix: bytes) -> None:
    body = prefix + _pad(json.dumps({"records": _records(10)}))
    assert await loads_chunked(body) == _jcs.loads(body)
    utf16 = json.dumps({"records": _records(2000)}).encode("utf-16")
    assert await loads_chunked(utf16) == _jcs.loads(utf16)
    assert _outcome(lambda: _jcs.loads(b"\xff" * BIG))[0] != "ok"
    with pytest.raises(ValueError):
        await loads_chunked(b'{"a": "\xff' + b" " * BIG + b'"}')


async def test_other_tasks_run_between_slices() -> None:
    body = json.dumps({"records": _records(500)}).encode() + b" " * BIG
    ticks: list[int] = []
    done = False

    async def other() -> None:
        while not done:
            ticks.append(1)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.lowlevel.checkpoint()
        before = len(ticks)
        result = await loads_chunked(body, slice_seconds=0)
        done = True
    assert len(result["records"]) == 500
    assert len(ticks) - before >= 400  # one checkpoint per element with a zero slice


async def test_a_large_batch_lets_healthz_answer_while_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the app: a batch of 1,000 records, a /healthz request started with it answers
    before the batch does (the parse yields at every element here)."""
    monkeypatch.setattr(chunked_json, "SLICE_SECONDS", 0.0)
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        state = serving_main(engine, max_body_bytes=4 << 20)
        order: list[str] = []
        records = _records(1000, pad="x" * 200)
        async with app_client(state, base_url="http://localhost") as client:

            async def batch() -> None:
                response = await client.post(
                    "/v1/ledgers/main/records/batch", json={"records": records}
                )
                assert response.status_code == 201, response.text
                order.append("batch")

            async def health() -> None:
                # Let the batch request start (its body is read, the parse begins) first.
                for _ in range(50):
                    await trio.lowlevel.checkpoint()
                assert (await client.get("/healthz")).status_code == 200
                order.append("healthz")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(batch)
                nursery.start_soon(health)
        assert order == ["healthz", "batch"]
        assert engine.state.length == 1000
