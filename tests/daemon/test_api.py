"""The HTTP/JSON API of a real `nucleus run` subprocess (one daemon shared by this module)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nucleus_actors import Hash, Record
from nucleus_actors.hashing import canonical_bytes, chain_hash, genesis, leaf_hash

from .conftest import DaemonProcess, client, read_events, running_daemon

TOKEN = "s3cret-token"
PROBLEM = "application/problem+json"
HEX64 = re.compile(r"[0-9a-f]{64}")

CONFIG = """
max_body_bytes = 65536

[[ledgers]]
id = "main"
storage = "main.db"
max_restarts = 100

[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:RequireFields"
config = { kinds = ["order."], fields = ["customer"] }

[[ledgers.modules]]
use = "tests.daemon.testmods:Explode"

[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:KindCounter"

[[ledgers]]
id = "aux"
storage = ":memory:"
max_record_bytes = 4096
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("api"), CONFIG, NUCLEUS_TOKEN=TOKEN) as process:
        yield process


@pytest.fixture
def api(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    assert daemon.url is not None
    with client(daemon.url, TOKEN) as c:
        yield c


@pytest.fixture
def anonymous(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    assert daemon.url is not None
    with client(daemon.url) as c:
        yield c


def length(api: httpx.Client, ledger: str = "main") -> int:
    response = api.get(f"/v1/ledgers/{ledger}/head")
    assert response.status_code == 200
    value: int = response.json()["length"]
    return value


def append(api: httpx.Client, kind: str, payload: Any, ledger: str = "main") -> httpx.Response:
    return api.post(f"/v1/ledgers/{ledger}/records", json={"kind": kind, "payload": payload})


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == f"tag:nucleus-actors,2025:problem/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["instance"] == response.request.url.path
    return body


# -- appends and reads -----------------------------------------------------------------------
def test_append_returns_receipt_and_reads_back(api: httpx.Client) -> None:
    before = length(api)
    sent = {"kind": "order.created", "payload": {"id": 1, "customer": "c1"}, "meta": {"t": "x"}}
    response = api.post("/v1/ledgers/main/records", json=sent)
    assert response.status_code == 201, response.text
    receipt = response.json()
    assert set(receipt) == {"seq", "hash", "timestamp"}
    assert receipt["seq"] == before
    assert HEX64.fullmatch(receipt["hash"])
    assert response.headers["location"] == f"/v1/ledgers/main/records/{before}"

    entry = api.get(f"/v1/ledgers/main/records/{before}").json()
    assert entry == {
        "seq": before,
        "kind": "order.created",
        "payload": {"id": 1, "customer": "c1"},
        "meta": {"t": "x"},
        "timestamp": receipt["timestamp"],
        "hash": receipt["hash"],
    }
    head = api.get("/v1/ledgers/main/head").json()
    assert head == {
        "ledger": "main",
        "length": before + 1,
        "head": receipt["hash"],
        "phase": "running",
    }


def test_served_hashes_verify_with_the_public_hash_functions(api: httpx.Client) -> None:
    for n in range(3):
        assert append(api, "note", {"n": n, "x": [1.5, None, "é"]}).status_code == 201
    prev: bytes = genesis("main")
    start = 0
    while start is not None:
        page = api.get("/v1/ledgers/main/records", params={"start": start, "limit": 2}).json()
        for e in page["entries"]:
            record = Record(
                e["kind"], e["payload"], e["meta"], seq=e["seq"], timestamp=e["timestamp"]
            )
            expected = chain_hash(prev, e["seq"], leaf_hash(canonical_bytes(record)))
            assert e["hash"] == expected.hex()
            prev = Hash.from_hex(e["hash"])
        start = page["next"]
    assert api.get("/v1/ledgers/main/head").json()["head"] == prev.hex()


def test_batch_is_all_or_nothing(api: httpx.Client) -> None:
    before = length(api)
    records = [{"kind": "order.created", "payload": {"customer": f"c{i}"}} for i in range(3)]
    response = api.post("/v1/ledgers/main/records/batch", json={"records": records})
    assert response.status_code == 201, response.text
    receipts = response.json()["receipts"]
    assert [r["seq"] for r in receipts] == [before, before + 1, before + 2]
    assert all(HEX64.fullmatch(r["hash"]) for r in receipts)

    records[1] = {"kind": "order.created", "payload": {"id": 9}}  # no customer: vetoed
    refused = api.post("/v1/ledgers/main/records/batch", json={"records": records})
    body = assert_problem(refused, 409, "record-rejected")
    assert body["module"] == "require-fields"
    assert body["index"] == 1
    assert length(api) == before + 3

    records[1] = {"kind": "bad kind", "payload": 1}  # invalid record
    invalid = api.post("/v1/ledgers/main/records/batch", json={"records": records})
    body = assert_problem(invalid, 422, "invalid-record")
    assert body["index"] == 1
    assert body["path"] == "$.kind"
    assert length(api) == before + 3

    empty = api.post("/v1/ledgers/main/records/batch", json={"records": []})
    assert_problem(empty, 422, "invalid-request")


def test_range_pages_to_the_head(api: httpx.Client) -> None:
    for n in range(5):
        assert append(api, "page", n).status_code == 201
    total = length(api)
    seen: list[int] = []
    start: int | None = 0
    while start is not None:
        response = api.get("/v1/ledgers/main/records", params={"start": start, "limit": 3})
        assert response.status_code == 200
        page = response.json()
        assert len(page["entries"]) <= 3
        seen += [e["seq"] for e in page["entries"]]
        start = page["next"]
    assert seen == list(range(total))
    tail = api.get("/v1/ledgers/main/records", params={"start": total - 1}).json()
    assert [e["seq"] for e in tail["entries"]] == [total - 1]
    assert tail["next"] is None
    beyond = api.get("/v1/ledgers/main/records", params={"start": total + 10}).json()
    assert beyond == {"entries": [], "next": None}


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"start": -1}, "query.start"),
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
    ],
)
def test_bad_range_parameters_are_422(
    api: httpx.Client, params: dict[str, int], where: str
) -> None:
    body = assert_problem(
        api.get("/v1/ledgers/main/records", params=params), 422, "invalid-request"
    )
    assert body["errors"][0]["path"] == where


# -- refusals --------------------------------------------------------------------------------
def test_rejected_record_is_409_with_module_and_reason(api: httpx.Client) -> None:
    before = api.get("/v1/ledgers/main/head").json()
    body = assert_problem(append(api, "order.created", {"id": 3}), 409, "record-rejected")
    assert body["module"] == "require-fields"
    assert "customer" in body["reason"]
    assert body["ledger"] == "main"
    assert api.get("/v1/ledgers/main/head").json() == before


@pytest.mark.parametrize(
    "content",
    [b'{"kind": "a", "payload": ', b"not json", b"", b"\xff\xfe", b"[" * 5000],
    ids=["truncated", "words", "empty", "not-utf8", "too-deep"],
)
def test_malformed_json_is_400(api: httpx.Client, content: bytes) -> None:
    before = length(api)
    response = api.post(
        "/v1/ledgers/main/records", content=content, headers={"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-json")
    assert length(api) == before


@pytest.mark.parametrize(
    ("body", "slug", "path"),
    [
        ({"kind": "has space", "payload": 1}, "invalid-record", "$.kind"),
        ({"kind": "", "payload": 1}, "invalid-record", "$.kind"),
        ({"kind": "big", "payload": {"n": 2**60}}, "invalid-record", "$.payload.n"),
        ({"kind": "a", "payload": 1, "meta": {"k": 1}}, "invalid-request", "body.meta.k"),
        ({"kind": 7, "payload": 1}, "invalid-request", "body.kind"),
        ({"kind": "a"}, "invalid-request", "body.payload"),
        ({"kind": "a", "payload": 1, "extra": True}, "invalid-request", "body.extra"),
        ([1, 2], "invalid-request", "body"),
    ],
)
def test_invalid_record_or_request_is_422(
    api: httpx.Client, body: Any, slug: str, path: str
) -> None:
    before = length(api)
    problem = assert_problem(api.post("/v1/ledgers/main/records", json=body), 422, slug)
    if slug == "invalid-record":
        assert problem["path"] == path
    else:
        assert path in [e["path"] for e in problem["errors"]]
    assert length(api) == before


def test_record_over_max_record_bytes_is_422(api: httpx.Client) -> None:
    before = length(api, "aux")
    body = assert_problem(append(api, "big", "x" * 5000, ledger="aux"), 422, "invalid-record")
    assert "max_record_bytes=4096" in body["detail"]
    assert append(api, "big", "x" * 3000, ledger="aux").status_code == 201
    assert length(api, "aux") == before + 1


def test_oversized_body_is_413_before_parsing(api: httpx.Client) -> None:
    before = length(api)
    big = json.dumps({"kind": "big", "payload": "x" * 70_000}).encode()
    body = assert_problem(
        api.post(
            "/v1/ledgers/main/records", content=big, headers={"content-type": "application/json"}
        ),
        413,
        "body-too-large",
    )
    assert body["limit"] == 65536

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield big[:40_000]
        yield big[40_000:]

    assert_problem(
        api.post(
            "/v1/ledgers/main/records",
            content=chunks(),
            headers={"content-type": "application/json"},
        ),
        413,
        "body-too-large",
    )
    # Not even parsed: garbage over the limit is 413, not 400.
    assert_problem(
        api.post(
            "/v1/ledgers/main/records",
            content=b"{" * 70_000,
            headers={"content-type": "application/json"},
        ),
        413,
        "body-too-large",
    )
    assert length(api) == before


def test_writes_need_the_token(anonymous: httpx.Client, api: httpx.Client) -> None:
    before = length(api)
    missing = append(anonymous, "note", 1)
    assert_problem(missing, 401, "unauthorized")
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = anonymous.post(
        "/v1/ledgers/main/records",
        json={"kind": "note", "payload": 1},
        headers={"Authorization": "Bearer not-the-token"},
    )
    assert_problem(wrong, 401, "unauthorized")
    batch = anonymous.post("/v1/ledgers/main/records/batch", json={"records": []})
    assert_problem(batch, 401, "unauthorized")
    # Checked before the body: even malformed JSON without a token is 401.
    garbage = anonymous.post(
        "/v1/ledgers/main/records", content=b"{", headers={"content-type": "application/json"}
    )
    assert_problem(garbage, 401, "unauthorized")
    assert length(api) == before
    # Reads are open.
    assert anonymous.get("/v1/ledgers/main/head").status_code == 200


def test_wrong_media_type_is_415(api: httpx.Client) -> None:
    response = api.post(
        "/v1/ledgers/main/records",
        content=b'{"kind": "a", "payload": 1}',
        headers={"content-type": "text/plain"},
    )
    assert_problem(response, 415, "unsupported-media-type")
    ok = api.post(
        "/v1/ledgers/main/records",
        content=b'{"kind": "a", "payload": 1}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 201


def test_unknown_ledger_seq_and_route_are_404(api: httpx.Client) -> None:
    body = assert_problem(append(api, "note", 1, ledger="nope"), 404, "unknown-ledger")
    assert body["ledger"] == "nope"
    assert_problem(api.get("/v1/ledgers/nope/records/0"), 404, "unknown-ledger")
    assert_problem(api.get("/v1/ledgers/nope/head"), 404, "unknown-ledger")
    assert_problem(api.get("/v1/ledgers/nope/stream"), 404, "unknown-ledger")
    total = length(api)
    body = assert_problem(api.get(f"/v1/ledgers/main/records/{total + 5}"), 404, "unknown-seq")
    assert body["seq"] == total + 5
    assert_problem(api.get("/v1/ledgers/main/records/-1"), 422, "invalid-request")
    assert_problem(api.get("/v2/whatever"), 404, "not-found")
    assert_problem(api.delete("/v1/ledgers/main/records"), 405, "method-not-allowed")


def test_module_crash_during_append_is_503_with_retry_after(api: httpx.Client) -> None:
    before = length(api)
    response = append(api, "explode", 1)
    body = assert_problem(response, 503, "module-failed")
    assert body["module"] == "explode"
    assert "RuntimeError" in body["cause"]
    assert int(response.headers["retry-after"]) >= 1
    assert length(api) == before
    # The supervisor restarted it: the next append goes through.
    assert append(api, "note", "after the crash").status_code == 201
    statuses = {m["id"]: m for m in api.get("/v1/ledgers/main/modules").json()["modules"]}
    assert statuses["explode"]["crashes"] >= 1
    assert statuses["explode"]["state"] == "running"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
    | st.fixed_dictionaries(
        {"kind": st.text(max_size=10), "payload": st.integers() | st.text()},
        optional={
            "meta": st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers())
        },
    )
)
def test_no_bad_input_gets_a_5xx_or_changes_the_ledger(api: httpx.Client, body: Any) -> None:
    before = length(api, "aux")
    content = json.dumps(body).encode()  # may contain NaN / Infinity literals
    response = api.post(
        "/v1/ledgers/aux/records", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code in (201, 400, 409, 422), response.text
    assert length(api, "aux") == before + (response.status_code == 201)


# -- listings, health, OpenAPI ---------------------------------------------------------------
def test_ledgers_and_modules(api: httpx.Client) -> None:
    listed = api.get("/v1/ledgers").json()["ledgers"]
    assert [(entry["id"], entry["phase"]) for entry in listed] == [
        ("main", "running"),
        ("aux", "running"),
    ]
    modules = api.get("/v1/ledgers/main/modules").json()["modules"]
    assert [m["id"] for m in modules] == ["require-fields", "explode", "kind-counter"]
    assert set(modules[0]) == {
        "id", "version", "state", "restarts", "crashes", "last_error", "inbox_depth",
        "processed", "dropped", "stop_result", "incarnation", "cursor", "lag", "stalls", "pid",
        "info",
    }  # fmt: skip
    infos = {m["id"]: m["info"] for m in modules}
    assert infos["require-fields"] is None  # no describe()
    counter = infos["kind-counter"]
    assert counter["total"] == length(api)
    assert counter["total"] == sum(counter["kinds"].values())
    assert api.get("/v1/ledgers/aux/modules").json() == {"modules": []}
    # Read-only: no way to write module state.
    assert api.post("/v1/ledgers/main/modules", json={}).status_code == 405


def test_health_readiness_and_openapi(anonymous: httpx.Client) -> None:
    assert anonymous.get("/healthz").json() == {"status": "ok"}
    ready = anonymous.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["ledgers"] == {
        "main": {"phase": "running", "role": "writer"},
        "aux": {"phase": "running", "role": "writer"},
    }
    spec = anonymous.get("/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/v1/ledgers",
        "/v1/ledgers/{ledger}/records",
        "/v1/ledgers/{ledger}/records/batch",
        "/v1/ledgers/{ledger}/records/{seq}",
        "/v1/ledgers/{ledger}/head",
        "/v1/ledgers/{ledger}/modules",
        "/v1/ledgers/{ledger}/stream",
        "/healthz",
        "/readyz",
    }


# -- server-sent events ----------------------------------------------------------------------
def test_stream_receives_new_entries_and_resumes(api: httpx.Client, daemon: DaemonProcess) -> None:
    assert daemon.url is not None
    with client(daemon.url) as reader:
        with reader.stream("GET", "/v1/ledgers/aux/stream") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            receipts = [append(api, "tick", n, ledger="aux").json() for n in range(3)]
            events = read_events(stream, 3)
        assert [e["event"] for e in events] == ["entry"] * 3
        assert [int(e["id"]) for e in events] == [r["seq"] for r in receipts]
        data = [json.loads(e["data"]) for e in events]
        assert [d["payload"] for d in data] == [0, 1, 2]
        assert [d["hash"] for d in data] == [r["hash"] for r in receipts]

        # Reconnect with Last-Event-ID: resumes right after it, old entries first.
        first = receipts[0]["seq"]
        with reader.stream(
            "GET", "/v1/ledgers/aux/stream", headers={"Last-Event-ID": str(first)}
        ) as stream:
            resumed = read_events(stream, 2)
        assert [int(e["id"]) for e in resumed] == [first + 1, first + 2]

        # ?from= starts at that seq.
        with reader.stream("GET", "/v1/ledgers/aux/stream", params={"from": first}) as stream:
            again = read_events(stream, 3)
        assert [int(e["id"]) for e in again] == [first, first + 1, first + 2]

        bad = reader.get("/v1/ledgers/aux/stream", headers={"Last-Event-ID": "abc"})
        assert_problem(bad, 422, "invalid-request")
