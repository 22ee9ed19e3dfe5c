"""API fuzzing with schemathesis against a real daemon: no 5xx, responses match the OpenAPI.

Bounded: `EXAMPLES` generated requests per operation, derandomized (the same requests every
run, so a failure reproduces), the endless SSE stream left out. Every call is counted: the
last test checks that the run really exercised every operation.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from nucleus_actors.daemon import DaemonState, create_app

from .conftest import DaemonProcess, running_daemon

TOKEN = "fuzz-token"
EXAMPLES = 25

CONFIG = """
max_body_bytes = 65536
[[ledgers]]
id = "main"
storage = ":memory:"
max_record_bytes = 8192

[[ledgers.modules]]
use = "require-fields"
config = { kinds = ["order."], fields = ["customer"] }

[[ledgers.modules]]
use = "json-schema"
config.schemas."note" = { type = "object", required = ["text"] }

[[ledgers.modules]]
use = "kind-counter"
"""


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    """The stream route's body: one JSON value per line (a non-list is one line)."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


@schemathesis.deserializer("application/x-ndjson")
def _ndjson_lines(ctx: Any, response: Any) -> list[Any]:
    return [json.loads(line) for line in response.content.splitlines() if line.strip()]


CALLS: collections.Counter[tuple[str, str]] = collections.Counter()
STATUSES: collections.Counter[int] = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("fuzz"), CONFIG, NUCLEUS_TOKEN=TOKEN) as daemon:
        yield daemon


def openapi_document() -> dict[str, Any]:
    """The daemon's OpenAPI document, built from the code (the daemon serves the same one:
    checked below), so that tests can be generated before the daemon starts."""
    document: dict[str, Any] = create_app(
        DaemonState({}, token=None, max_body_bytes=1024)
    ).openapi()
    return document


OPENAPI = openapi_document()
schema = schemathesis.openapi.from_dict(OPENAPI).exclude(
    path_regex=r"^/v1/ledgers/\{ledger\}/(stream|events)$"  # an SSE stream never ends
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_gets_a_5xx_and_every_response_matches_the_schema(
    case: Any, fuzz_daemon: DaemonProcess
) -> None:
    params = case.path_parameters
    if params and "ledger" in params and len(str(params["ledger"])) % 2 == 0:
        params["ledger"] = "main"  # half the cases reach a real ledger, half an unknown one
    response = case.call_and_validate(
        base_url=fuzz_daemon.url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[not_a_server_error, response_schema_conformance],
        timeout=30,
    )
    CALLS[(case.method, case.path)] += 1
    STATUSES[response.status_code] += 1


def test_the_daemon_serves_the_fuzzed_document(fuzz_daemon: DaemonProcess) -> None:
    served = httpx.get(f"{fuzz_daemon.url}/openapi.json").json()
    assert served == OPENAPI


OPERATIONS = {
    ("POST", "/v1/ledgers/{ledger}/records"),
    ("POST", "/v1/ledgers/{ledger}/records/batch"),
    ("POST", "/v1/ledgers/{ledger}/records/stream"),
    ("GET", "/v1/ledgers/{ledger}/records"),
    ("GET", "/v1/ledgers/{ledger}/records/{seq}"),
    ("GET", "/v1/ledgers/{ledger}/head"),
    ("GET", "/v1/ledgers/{ledger}/modules"),
    ("GET", "/v1/ledgers/{ledger}/statistics"),
    ("GET", "/v1/ledgers"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
}


def test_the_fuzzed_schema_has_every_operation() -> None:
    generated = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert generated >= OPERATIONS, OPERATIONS - generated


def _operation(item: pytest.Item) -> tuple[str, str]:
    """`(method, path)` of one operation's fuzz test (schemathesis names it `test[GET /path]`)."""
    method, _, path = item.name.partition("[")[2].removesuffix("]").partition(" ")
    return method, path


@pytest.fixture(scope="module", autouse=True)
def fuzz_run_covered_every_operation(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test of this module, in whatever order they ran: every operation the fuzz
    test was run for got requests, none got a 5xx; and when it ran for the whole schema (not a
    `-k` selection of operations), that was every operation, and some appends went through.

    Nothing is checked when the fuzz test was deselected, or when a test failed (reported
    already; with `-x` the rest did not run)."""
    yield
    fuzz_test = test_no_request_gets_a_5xx_and_every_response_matches_the_schema.__name__
    selected = {
        _operation(item)
        for item in request.session.items
        if item.module is request.module and getattr(item, "originalname", None) == fuzz_test
    }
    if not selected or request.session.testsfailed:
        return
    called = set(CALLS)
    assert called >= selected, selected - called
    assert all(status < 500 for status in STATUSES)
    generated = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    if selected >= generated:  # the whole schema was fuzzed
        assert called >= OPERATIONS, OPERATIONS - called
        assert STATUSES[201] > 0  # some appends went through
