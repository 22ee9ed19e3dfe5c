"""The HTTP/JSON API (FastAPI): records, ranges, heads, module statuses, SSE, health.

Paths and shapes are a contract for clients in other languages (docs/daemon.md):

| call | success |
|---|---|
| `POST /v1/ledgers/{ledger}/records` | 201 `{"seq","hash","timestamp"}` |
| `POST /v1/ledgers/{ledger}/records/batch` | 201 `{"receipts":[...]}` |
| `GET /v1/ledgers/{ledger}/records?start=&limit=` | 200 `{"entries":[...],"next"}` |
| `GET /v1/ledgers/{ledger}/records/{seq}` | 200 Entry |
| `GET /v1/ledgers/{ledger}/head` | 200 `{"ledger","length","head","phase"}` |
| `GET /v1/ledgers` | 200 `{"ledgers":[{"id","length","phase"}]}` |
| `GET /v1/ledgers/{ledger}/modules` | 200 `{"modules":[...]}` |
| `GET /v1/ledgers/{ledger}/stream?from=` | 200 `text/event-stream` |
| `GET /v1/ledgers/{ledger}/checkpoint` | 200 `text/plain` signed note |
| `GET /v1/ledgers/{ledger}/proof/inclusion?seq=&size=` | 200 `{"seq","size","leaf",...}` |
| `GET /v1/ledgers/{ledger}/proof/consistency?from=&to=` | 200 `{"from","to","path",...}` |
| `GET /healthz`, `GET /readyz`, `GET /openapi.json` | 200 |
| `GET /metrics` | 200 Prometheus text |

Errors are RFC 9457 problem details (see `problems`). Writes pass `_Guard` first: token,
body size (before anything is parsed) and media type.
"""

from __future__ import annotations

import copy
import dataclasses
import hmac
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Final, Literal

import trio
from fastapi import FastAPI, Header, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__, _jcs
from .._jcs import MAX_DEPTH, MAX_SAFE_INTEGER
from ..engine import LedgerEngine
from ..errors import InvalidRecord, LifecycleError, NucleusError, ProofError, _printable
from ..lifecycle import ModuleState
from ..module import Module
from ..module._describe import describe
from ..proofs import ConsistencyProof, InclusionProof
from ..record import KIND_FORBIDDEN, MAX_KIND_LENGTH, Record
from ..registry import ModuleHandle
from .auth import ReadGuard
from .chunked_json import loads_chunked
from .docs_ui import install_docs
from .fastpath import FastAppend
from .guards import Admission, HostCheck, RequestId, check_batch_size, checked_key
from .host import DaemonState, LedgerHost
from .problems import Problem, problem_from_error, problem_response
from .stream import install_stream_route, media_problem, stream_path
from .ui import install_ui
from .wire import dumps as _dumps
from .wire import entry_json, receipt_json

__all__ = ["create_app"]

log = logging.getLogger("nucleus_actors.daemon.http")

HEARTBEAT_SECONDS: Final = 15.0
"""A stream with nothing to send writes a comment line this often (keeps proxies open)."""
STREAM_CHUNK: Final = 256
"""A stream reads the ledger in chunks of this many entries."""
MAX_PAGE: Final = 1000
"""Largest `limit` of a range read."""
INFO_SECONDS: Final = 1.0
"""How long the modules API waits for each module's `describe()`."""
MAX_PAGE_BYTES: Final = 4 << 20
"""A range read stops adding entries once they hold this many canonical bytes (at least one
entry is always returned; `next` continues)."""

CHECK_SLICE: Final = 100
"""A batch's records are checked this many at a time, with a checkpoint between slices."""

LedgerId = Annotated[str, PathParam(description="ledger id")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        pattern=r'^([!-~]{1,255}|"[!-~]{1,255}")$',
        description="retry safely: the same key and body within idempotency_window return "
        "the first receipts (with `Idempotent-Replayed: true`) instead of appending again",
    ),
]


# -- schemas (request bodies and documented responses) ---------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)


def _kind_pattern() -> str:
    """`Record.kind`'s rule as an ECMA-262 / Python `pattern`: BMP characters as `\\uXXXX`
    escapes, astral ones literally (a `\\U` escape is not ECMA-262). Lone surrogates are left
    out of the class: they are not Unicode text, so no valid JSON string holds one (I-JSON),
    and regex engines working on UTF-8 refuse them in a class."""

    def literal(match: re.Match[str]) -> str:
        return chr(int(match.group(1), 16))

    forbidden = KIND_FORBIDDEN.replace(r"\ud800-\udfff", "")
    return "^[^" + re.sub(r"\\U([0-9a-fA-F]{8})", literal, forbidden) + "]+$"


JSON_VALUE_SCHEMA: Final[dict[str, Any]] = {
    "description": "A JSON value as records store it (RFC 8785 numbers are IEEE doubles). "
    "Numbers: integers and every whole number within +/-(2**53-1); whole numbers of "
    "magnitude in [2**53, 1e21) are refused however they are written (send them as "
    "strings); from 1e21 on, a number written with a fraction or an exponent (1e21, 1.5e300) "
    "is accepted. No NaN or infinities; strings are Unicode text (no lone surrogates); "
    f"arrays and objects nest at most {MAX_DEPTH} deep; object member names are unique "
    "(I-JSON). The record's canonical size is limited by the ledger's max_record_bytes.",
    "anyOf": [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "string"},
        {"type": "integer", "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER},
        {"type": "number", "not": {"type": "integer"}},
        {"type": "array", "items": {"$ref": "#/components/schemas/JsonValue"}},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/JsonValue"}},
    ],
}
"""The OpenAPI schema of a payload (`#/components/schemas/JsonValue`)."""


class RecordIn(_Model):
    """A record to append."""

    kind: str = Field(
        json_schema_extra={
            "minLength": 1,
            "maxLength": MAX_KIND_LENGTH,
            "pattern": _kind_pattern(),
        }
    )
    """What happened, e.g. `order.created`: 1..256 printable characters, no whitespace
    (no character of Unicode categories Cc, Cf, Cs, Zs, Zl, Zp)."""
    payload: Annotated[Any, WithJsonSchema({"allOf": [{"$ref": "#/components/schemas/JsonValue"}]})]
    """Any JSON value (see `JsonValue`: integers within +/-(2**53-1), send larger ones as
    strings)."""
    meta: dict[str, str] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"minLength": 1}}
    )
    """String metadata, covered by the hash (member names are non-empty)."""

    def record(self) -> Record:
        """The `Record` (raises `InvalidRecord` for a bad kind, payload or meta)."""
        return Record(self.kind, self.payload, self.meta)


class BatchIn(_Model):
    """Records to append all-or-nothing."""

    records: list[RecordIn] = Field(min_length=1)
    """The records, in order (at least one)."""


class ReceiptOut(BaseModel):
    """Where an appended record landed."""

    seq: int
    hash: str = Field(description="CHAIN_seq, 64 lowercase hex digits")
    timestamp: int = Field(description="commit time, UTC microseconds since the Unix epoch")


class BatchOut(BaseModel):
    """Receipts of a batch, in order (contiguous seqs)."""

    receipts: list[ReceiptOut]


class EntryOut(BaseModel):
    """A committed entry."""

    seq: int
    kind: str
    payload: Any
    meta: dict[str, str]
    timestamp: int = Field(description="commit time, UTC microseconds since the Unix epoch")
    hash: str = Field(description="CHAIN_seq, 64 lowercase hex digits")


class PageOut(BaseModel):
    """A page of a range read."""

    entries: list[EntryOut]
    next: int | None = Field(description="the `start` of the next page, or null at the head")


class HeadOut(BaseModel):
    """A ledger's length, head hash and lifecycle phase."""

    ledger: str
    length: int
    head: str = Field(description="chain hash of the last entry (the genesis hash if empty)")
    phase: str
    role: str | None = Field(
        default=None,
        description="PostgreSQL ledgers: `writer`, or `standby` (another daemon writes it)",
    )
    epoch: int | None = Field(default=None, description="PostgreSQL ledgers: the lease epoch")


class LedgerOut(BaseModel):
    """One ledger of the daemon."""

    id: str
    length: int
    phase: str


class LedgersOut(BaseModel):
    """Every ledger of the daemon, in configuration order."""

    ledgers: list[LedgerOut]


class ModuleStatusOut(BaseModel):
    """Snapshot of one module (the fields of `ModuleStatus`)."""

    id: str
    version: str
    state: str
    restarts: int
    crashes: int
    last_error: str | None
    inbox_depth: int
    processed: int
    dropped: int
    stop_result: str | None
    incarnation: int
    cursor: int | None = None
    lag: int = 0
    stalls: int = 0
    pid: int | None = Field(
        default=None,
        description='process id of the module\'s worker (isolation = "process"), else null',
    )
    info: dict[str, Any] | None = Field(
        description="what the module's `describe()` reports (null when it has none, or did "
        "not answer within a second)"
    )


class ModulesOut(BaseModel):
    """Module statuses of a ledger, in start order."""

    modules: list[ModuleStatusOut]


class InclusionProofOut(BaseModel):
    """Entry `seq` is in the Merkle tree of `size` entries (RFC 9162 inclusion proof)."""

    seq: int
    size: int
    leaf: str = Field(description="LEAF_seq, 64 lowercase hex digits")
    path: list[str] = Field(description="sibling hashes, the one next to the leaf first (hex)")
    root: str = Field(description="Merkle root of the tree of `size` entries (hex)")


class ConsistencyProofOut(BaseModel):
    """The tree of `from` entries is a prefix of the tree of `to` entries (RFC 9162)."""

    model_config = ConfigDict(populate_by_name=True)
    from_: int = Field(alias="from")
    to: int
    old_root: str = Field(description="Merkle root at size `from` (hex)")
    new_root: str = Field(description="Merkle root at size `to` (hex)")
    path: list[str] = Field(description="RFC 9162 consistency proof hashes (hex)")


class ProblemOut(BaseModel):
    """RFC 9457 problem details (extension members vary by `type`)."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str
    instance: str


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ProblemOut, "content": {"application/problem+json": {}}}
        for status in statuses
    }


# -- the write guard -------------------------------------------------------------------------
def _authorized(header: str | None, token: str) -> bool:
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


_ROUTED_CACHE: Final = 4096


class _Guard:
    """ASGI middleware in front of every write (POST): token, then body size, then media type.

    The body is read here, at most `max_body_bytes` of it (a larger `Content-Length` is
    refused before a byte is read), and replayed to the app; nothing is parsed before these
    checks pass.
    """

    def __init__(self, app: ASGIApp, state: DaemonState, routes: list[Any] | None = None) -> None:
        self.app = app
        self.state = state
        self.routes = routes
        self._routed_paths: dict[str, bool] = {}  # POST path -> routed (bounded cache)

    def _routed(self, scope: Scope) -> bool:
        """True when some route takes this POST (else routing answers 404/405 itself).

        Routing a POST depends only on its path: the answer is cached per path (at most
        `_ROUTED_CACHE` of them, then the cache starts again), so the common paths skip the
        walk over every route."""
        if self.routes is None:
            return True
        path = scope["path"]
        known = self._routed_paths.get(path)
        if known is not None:
            return known
        routed = any(route.matches(scope)[0] is Match.FULL for route in self.routes)
        if len(self._routed_paths) >= _ROUTED_CACHE:
            self._routed_paths.clear()
        self._routed_paths[path] = routed
        return routed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self._routed(scope):
            await self.app(scope, receive, send)
            return
        if stream_path(scope["path"]):
            await self._stream(scope, receive, send)
            return
        problem = self._check_headers(Headers(scope=scope))
        if problem is not None:
            await problem_response(problem, scope["path"])(scope, receive, send)
            return
        limit = self.state.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await problem_response(_too_large(limit), scope["path"])(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body.strip():
            problem = Problem("malformed-json", "the body is empty: send a JSON object")
            await problem_response(problem, scope["path"])(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The NDJSON stream route: token and media type; its body is read as it arrives
        (no `max_body_bytes` for the whole body: each line is bounded instead)."""
        headers = Headers(scope=scope)
        token = self.state.token
        problem = None
        if token is not None and not _authorized(headers.get("authorization"), token):
            problem = Problem(
                "unauthorized",
                "writes need the header 'Authorization: Bearer <token>' with the daemon's token",
                headers={"WWW-Authenticate": 'Bearer realm="nucleus"'},
            )
        problem = problem or media_problem(headers.get("content-type"))
        if problem is not None:
            await problem_response(problem, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, headers: Headers) -> Problem | None:
        token = self.state.token
        if token is not None and not _authorized(headers.get("authorization"), token):
            return Problem(
                "unauthorized",
                "writes need the header 'Authorization: Bearer <token>' with the daemon's token",
                headers={"WWW-Authenticate": 'Bearer realm="nucleus"'},
            )
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return Problem("bad-request", f"Content-Length {declared!r} is not a number")
            if int(declared) > self.state.max_body_bytes:
                return _too_large(self.state.max_body_bytes, int(declared))
        if not _is_json(headers.get("content-type")):
            return Problem(
                "unsupported-media-type",
                f"send JSON with 'Content-Type: application/json', "
                f"got {headers.get('content-type')!r}",
            )
        return None


def _too_large(limit: int, size: int | None = None) -> Problem:
    what = "the request body" if size is None else f"the request body ({size} bytes)"
    return Problem(
        "body-too-large",
        f"{what} is over max_body_bytes={limit}",
        limit=limit,
    )


def _publish_json_value(app: FastAPI) -> None:
    """Add `JsonValue` (the payload schema, recursive) to the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas["JsonValue"] = JSON_VALUE_SCHEMA
        record = schemas.get("RecordIn")
        if record is not None and "StreamRecordIn" not in schemas:
            # A line of the NDJSON stream: a record, optionally with its own idempotency key.
            line = copy.deepcopy(record)
            line["title"] = "StreamRecordIn"
            line["description"] = (
                "A record to append from the NDJSON stream: `RecordIn`, optionally with the "
                "record's own `idempotency_key` (not part of the record)."
            )
            line["properties"]["idempotency_key"] = {
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "pattern": "^[!-~]+$",
                "description": "The record's idempotency key, with the `Idempotency-Key` "
                "header's semantics: a line whose key was committed for the same record "
                'within idempotency_window answers the first receipt with `"replayed": true` '
                "and appends nothing; a key used for a different record is a 422 "
                "`idempotency-key-reused` line, a key in flight a 409 "
                "`idempotency-key-in-flight` line. Resume a cut stream by resending every "
                "line with the same keys.",
            }
            schemas["StreamRecordIn"] = line
        return document

    app.openapi = openapi  # type: ignore[method-assign]


# -- I-JSON bodies and method routing --------------------------------------------------------
class _IJsonRoute(APIRoute):
    """A route whose JSON body is parsed as I-JSON (RFC 7493): a duplicate member name is a
    422 problem naming it, where `json.loads` would silently keep the last value. A large body
    is parsed in slices with checkpoints between them (`chunked_json`), so a 4 MiB batch does
    not hold the event loop for the whole parse."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def parse_then_handle(request: Request) -> Response:
            if _is_json(request.headers.get("content-type")):
                try:
                    # Starlette's Request.json() returns `_json` when it is set: FastAPI then
                    # validates what this parse produced instead of parsing again.
                    request._json = await loads_chunked(await request.body())
                except _jcs.DuplicateKey as exc:
                    raise Problem("invalid-request", str(exc), key=_printable(exc.key)) from None
                except (ValueError, RecursionError):
                    pass  # not JSON: FastAPI parses again and reports it (malformed-json)
            response: Response = await handler(request)
            return response

        return parse_then_handle


def _allowed_methods(routes: list[Any], scope: Scope) -> list[str]:
    """The methods of the routes serving `scope`'s path, for `Allow`, sorted.

    When several route paths match (`.../records/batch` also matches `.../records/{seq}`),
    the most literal ones (fewest path parameters) name the resource, as the OpenAPI does.
    """
    probe = {**scope, "method": "\0"}  # matches no route's method: a path-only match
    matching = [route for route in routes if route.matches(probe)[0] is not Match.NONE]
    if not matching:
        return []
    fewest = min(len(getattr(route, "param_convertors", {})) for route in matching)
    methods: set[str] = set()
    for route in matching:
        if len(getattr(route, "param_convertors", {})) == fewest:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


# -- the app ---------------------------------------------------------------------------------
# FastAPI's OpenTelemetry bridge (newer FastAPI) asks the OpenTelemetry API on every request
# whether a provider is configured (environment lookups included): ~15 us per request. The
# daemon has its own /metrics; turn the bridge off where FastAPI has it.
_NO_TELEMETRY: Final[dict[str, Any]] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(state: DaemonState) -> FastAPI:
    """The FastAPI application serving `state`'s ledgers (one per daemon).

    Routes only use the engines' public API; engine errors become problem details
    (`problems.problem_from_error`). The app never starts or stops ledgers: the daemon does.
    """
    app = FastAPI(
        title="nucleus_actors ledger daemon",
        version=__version__,
        description="Append-only blake3-chained ledgers with supervised modules. "
        "Errors are RFC 9457 problem details (application/problem+json).",
        openapi_url="/openapi.json",
        docs_url=None,  # install_docs: Swagger UI served locally (works offline)
        redoc_url=None,
        **_NO_TELEMETRY,
    )
    install_docs(app, title=app.title)
    app.router.route_class = _IJsonRoute
    _publish_json_value(app)
    app.add_middleware(FastAppend, state=state)  # innermost: after every guard
    app.add_middleware(_Guard, state=state, routes=app.router.routes)
    app.add_middleware(ReadGuard, state=state)
    app.add_middleware(Admission, state=state)
    app.add_middleware(HostCheck, state=state)
    app.add_middleware(RequestId)
    _install_error_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="Needed for writes when a token is set.")
    write_security = [Security(bearer)]

    lookup = state.lookup

    def serving(ledger: str) -> tuple[LedgerHost, LedgerEngine]:
        host = lookup(ledger)
        if not host.serving:
            failure = host.failure
            why = f": {type(failure).__name__}: {failure}" if failure is not None else ""
            raise Problem(
                "ledger-unavailable",
                f"ledger {ledger!r} is {host.phase.name}{why}",
                ledger=ledger,
                phase=str(host.phase),
            )
        return host, host.engine

    def writing(ledger: str) -> tuple[LedgerHost, LedgerEngine]:
        host, engine = serving(ledger)
        host.check_writable()
        return host, engine

    @app.post(
        "/v1/ledgers/{ledger}/records",
        status_code=201,
        response_model=ReceiptOut,
        dependencies=write_security,
        responses=_problems(400, 401, 404, 409, 413, 415, 421, 422, 503),
        summary="Append one record",
    )
    async def append(
        ledger: LedgerId, body: RecordIn, idempotency_key: IdempotencyKey = None
    ) -> Response:
        _, engine = writing(ledger)
        replayed = False
        if idempotency_key is None:
            receipt = await engine.append(body.record())
        else:
            receipts, replayed = await engine.append_keyed(
                [body.record()], checked_key(idempotency_key)
            )
            receipt = receipts[0]
        headers = {"Location": f"/v1/ledgers/{ledger}/records/{receipt.seq}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return JSONResponse(receipt_json(receipt), status_code=201, headers=headers)

    @app.post(
        "/v1/ledgers/{ledger}/records/batch",
        status_code=201,
        response_model=BatchOut,
        dependencies=write_security,
        responses=_problems(400, 401, 404, 409, 413, 415, 421, 422, 503),
        summary="Append records all-or-nothing",
    )
    async def append_batch(
        ledger: LedgerId, body: BatchIn, idempotency_key: IdempotencyKey = None
    ) -> Response:
        _, engine = writing(ledger)
        check_batch_size(state, len(body.records))
        records = []
        for index, item in enumerate(body.records):
            if index % CHECK_SLICE == CHECK_SLICE - 1:
                await trio.lowlevel.checkpoint()  # let other requests run (/healthz, reads)
            try:
                records.append(item.record())
            except InvalidRecord as exc:
                raise Problem(
                    "invalid-record",
                    f"record {index} of the batch: {exc}",
                    ledger=ledger,
                    path=exc.path,
                    index=index,
                ) from exc
        replayed = False
        if idempotency_key is None:
            receipts = await engine.append_many(records)
        else:
            receipts, replayed = await engine.append_keyed(records, checked_key(idempotency_key))
        return JSONResponse(
            {"receipts": [receipt_json(r) for r in receipts]},
            status_code=201,
            headers={"Idempotent-Replayed": "true"} if replayed else None,
        )

    install_stream_route(
        app, state, writing, write_security, _problems(401, 404, 413, 415, 422, 503)
    )

    @app.get(
        "/v1/ledgers/{ledger}/records",
        response_model=PageOut,
        responses=_problems(404, 422, 503),
        summary="Read a range of entries",
    )
    async def read_range(
        ledger: LedgerId,
        start: Annotated[int, Query(ge=0, description="first seq")] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="most entries")] = 100,
    ) -> Response:
        _, engine = serving(ledger)
        length = engine.state.length
        stop = min(length, start + limit)
        entries: list[dict[str, Any]] = []
        size = 0
        if start < stop:
            reader = engine.read(start, stop)
            try:
                async for entry in reader:
                    entries.append(entry_json(entry))
                    size += len(entry.canonical)
                    if size >= MAX_PAGE_BYTES:
                        break  # `next` says where to go on
            finally:
                aclose = getattr(reader, "aclose", None)
                if aclose is not None:
                    await aclose()
        after = start + len(entries)
        return JSONResponse({"entries": entries, "next": after if after < length else None})

    @app.get(
        "/v1/ledgers/{ledger}/records/{seq}",
        response_model=EntryOut,
        responses=_problems(404, 422, 503),
        summary="Read one entry",
    )
    async def read_one(
        ledger: LedgerId, seq: Annotated[int, PathParam(ge=0, description="entry seq")]
    ) -> Response:
        _, engine = serving(ledger)
        try:
            entry = await engine.get(seq)
        except IndexError:
            raise Problem(
                "unknown-seq",
                f"ledger {ledger!r} has no entry {seq} (length {engine.state.length})",
                ledger=ledger,
                seq=seq,
            ) from None
        return JSONResponse(entry_json(entry))

    @app.get(
        "/v1/ledgers/{ledger}/head",
        response_model=HeadOut,
        responses=_problems(404),
        summary="Length, head hash and phase",
    )
    async def head(ledger: LedgerId) -> Response:
        host = lookup(ledger)
        state_ = host.engine.state
        out: dict[str, Any] = {
            "ledger": ledger,
            "length": state_.length,
            "head": state_.head.hex(),
            "phase": str(state_.phase),
        }
        if host.role is not None:  # a PostgreSQL ledger
            out["role"], out["epoch"] = host.role, host.epoch
        return JSONResponse(out)

    @app.get(
        "/v1/ledgers/{ledger}/checkpoint",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "C2SP signed note holding a C2SP tlog-checkpoint "
                "(docs/verification.md)",
            },
            **_problems(404, 500, 503),
        },
        summary="The latest signed checkpoint (signing one first if the ledger grew)",
    )
    async def checkpoint(ledger: LedgerId) -> Response:
        host, _ = serving(ledger)
        if host.signer is None:
            raise Problem(
                "no-checkpoint",
                f"ledger {ledger!r} has no checkpoint_key: it signs no checkpoints",
                ledger=ledger,
            )
        note = await host.signer.latest()
        return Response(note, media_type="text/plain; charset=utf-8")

    async def proof_response(
        ledger: str, prove: Callable[[LedgerEngine], Awaitable[InclusionProof | ConsistencyProof]]
    ) -> Response:
        """`prove(engine)` as JSON; its `ProofError` (the request is well-formed, but the
        ledger has no such tree or entry) as a 404 `not-found` problem."""
        _, engine = serving(ledger)
        try:
            proof = await prove(engine)
        except ProofError as exc:
            raise Problem("not-found", str(exc), ledger=ledger) from None
        return JSONResponse(proof.to_json())

    @app.get(
        "/v1/ledgers/{ledger}/proof/inclusion",
        response_model=InclusionProofOut,
        responses=_problems(404, 422, 503),
        summary="Merkle inclusion proof of an entry",
    )
    async def inclusion_proof(
        ledger: LedgerId,
        seq: Annotated[int, Query(ge=0, description="the entry's seq")],
        size: Annotated[
            int | None, Query(ge=1, description="tree size (default: the ledger length)")
        ] = None,
    ) -> Response:
        return await proof_response(ledger, lambda engine: engine.inclusion_proof(seq, size))

    @app.get(
        "/v1/ledgers/{ledger}/proof/consistency",
        response_model=ConsistencyProofOut,
        responses=_problems(404, 422, 503),
        summary="Merkle consistency proof between two tree sizes",
    )
    async def consistency_proof(
        ledger: LedgerId,
        from_: Annotated[int, Query(alias="from", ge=1, description="the older tree size")],
        to: Annotated[
            int | None, Query(ge=1, description="the newer tree size (default: the length)")
        ] = None,
    ) -> Response:
        return await proof_response(ledger, lambda engine: engine.consistency_proof(from_, to))

    @app.get("/v1/ledgers", response_model=LedgersOut, summary="Every ledger of the daemon")
    async def ledgers() -> Response:
        out = []
        for host in state.hosts.values():
            s = host.engine.state
            out.append({"id": host.id, "length": s.length, "phase": str(s.phase)})
        return JSONResponse({"ledgers": out})

    @app.get(
        "/v1/ledgers/{ledger}/modules",
        response_model=ModulesOut,
        responses=_problems(404),
        summary="Module statuses (read-only)",
    )
    async def modules(ledger: LedgerId) -> Response:
        host = lookup(ledger)
        statuses = host.engine.modules.status()
        infos = await _module_infos(host)
        out = [{**dataclasses.asdict(s), "info": infos.get(s.id)} for s in statuses]
        return JSONResponse({"modules": out})

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format (OpenMetrics if the Accept header asks)",
            }
        },
        summary="Prometheus metrics (docs/metrics.md)",
    )
    async def metrics(request: Request) -> Response:
        body, content_type = state.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get(
        "/v1/ledgers/{ledger}/stream",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"},
            **_problems(404, 422, 503),
        },
        summary="Follow new entries (server-sent events)",
    )
    async def stream(
        ledger: LedgerId,
        from_: Annotated[
            int | None,
            Query(alias="from", ge=0, description="first seq to send (default: the head)"),
        ] = None,
        last_event_id: Annotated[
            str | None, Header(alias="Last-Event-ID", description="resume after this seq")
        ] = None,
    ) -> Response:
        host, engine = serving(ledger)
        if last_event_id is not None:
            text = last_event_id.strip()
            # ASCII digits only ('²'.isdigit() is true), at most 19 of them (a seq fits)
            if not (text.isascii() and text.isdigit() and len(text) <= 19):
                raise Problem(
                    "invalid-request",
                    f"Last-Event-ID must be the seq of an entry, got {last_event_id!r}",
                    ledger=ledger,
                )
            start = int(text) + 1
        elif from_ is not None:
            start = from_
        else:
            start = engine.state.length
        return StreamingResponse(
            _events(state, host, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/healthz", summary="Liveness: the daemon answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: every ledger RUNNING (with ?role=writer: this daemon writes one)",
        responses=_problems(422, 503),
    )
    async def readyz(
        role: Annotated[
            Literal["writer"] | None,
            Query(description="`writer`: 503 unless this daemon writes at least one ledger"),
        ] = None,
    ) -> Response:
        ledgers = {host.id: host.readiness() for host in state.hosts.values()}
        ready = not state.stopping and all(
            host.serving
            and host.phase.name == "RUNNING"
            and (host.settings.role != "writer" or host.role != "standby")
            for host in state.hosts.values()
        )
        bound = state.limits.stall_timeout
        stalled = {
            host.id: round(host.engine.append_stalled_for(), 3)
            for host in state.hosts.values()
            if host.serving and host.engine.append_stalled_for() > bound
        }
        writes = [
            host.id for host in state.hosts.values() if host.serving and host.role != "standby"
        ]
        if role == "writer" and not writes and not state.stopping:
            raise Problem(
                "not-ready",
                "this daemon writes no ledger (every ledger here is a standby or down)",
                ledgers=ledgers,
            )
        if not ready or stalled:
            why = "the daemon is stopping" if state.stopping else "not every ledger is running"
            if ready:
                why = (
                    f"appends to {', '.join(map(repr, stalled))} made no progress for over "
                    f"stall_timeout={bound:g} s"
                )
            raise Problem("not-ready", why, ledgers=ledgers, stalled=stalled or None)
        return JSONResponse({"status": "ready", "ledgers": ledgers})

    install_ui(app, state)  # /ui, /v1/ledgers/{ledger}/events and /statistics (ui.py, events.py)
    return app


async def _events(state: DaemonState, host: LedgerHost, start: int) -> AsyncIterator[str]:
    """The SSE body: every entry from `start` on, then new ones as they commit.

    New entries are noticed through `engine.wait_length`, whoever appended them. Ends when the
    daemon stops; when the ledger stops serving it sends what is committed, then an `error`
    event (a problem object), and ends.
    """
    engine = host.engine
    next_seq = start
    ending = False  # the ledger will not grow any more
    while True:
        if state.stopping:
            # Say so (clients wait before reconnecting, instead of retrying into a daemon
            # that is going away), then end the response at once.
            yield f"event: shutdown\ndata: {_dumps({'detail': 'the daemon is shutting down'})}\n\n"
            return
        length = engine.state.length
        if next_seq < length:
            # Deliver what is committed, even while the ledger is going down (reads fail
            # once its engine is closed: that ends the stream with an error event).
            try:
                async for entry in engine.read(next_seq, min(length, next_seq + STREAM_CHUNK)):
                    yield f"id: {entry.seq}\nevent: entry\ndata: {_dumps(entry_json(entry))}\n\n"
                    next_seq = entry.seq + 1
            except NucleusError as exc:
                body = problem_from_error(exc, ledger=host.id).body("")
                yield f"event: error\ndata: {_dumps(body)}\n\n"
                return
            continue
        if ending or not host.serving:
            problem = Problem(
                "ledger-unavailable",
                f"ledger {host.id!r} is {host.phase.name}",
                ledger=host.id,
                phase=str(host.phase),
            )
            yield f"event: error\ndata: {_dumps(problem.body(''))}\n\n"
            return
        outcome = await _wait_for_entry(engine, next_seq + 1, host.changed)
        if outcome == "idle":
            yield ": keep-alive\n\n"
        elif outcome == "ended":
            ending = True


async def _wait_for_entry(engine: LedgerEngine, length: int, woken: trio.Event) -> str:
    """Wait until the ledger holds `length` entries ("grew"), it never will ("ended"), the
    host is notified ("woken": the daemon stops or the ledger fails), or `HEARTBEAT_SECONDS`
    pass ("idle")."""
    outcome = "idle"
    with trio.move_on_after(HEARTBEAT_SECONDS):
        async with trio.open_nursery() as nursery:

            async def grow() -> None:
                nonlocal outcome
                try:
                    await engine.wait_length(length)
                    outcome = "grew"
                except LifecycleError:
                    outcome = "ended"
                nursery.cancel_scope.cancel()

            async def wake() -> None:
                nonlocal outcome
                await woken.wait()
                outcome = "woken"
                nursery.cancel_scope.cancel()

            nursery.start_soon(grow)
            nursery.start_soon(wake)
    return outcome


async def _module_infos(host: LedgerHost) -> dict[str, Any]:
    """`describe()` of every RUNNING module of a serving ledger that has one, asked
    concurrently, each within `INFO_SECONDS` (a module that does not answer in time, or whose
    answer is not JSON, is left out)."""
    infos: dict[str, Any] = {}
    if not host.serving:
        return infos

    async def ask(handle: ModuleHandle[Module]) -> None:
        with trio.move_on_after(INFO_SECONDS):
            try:
                info = await handle.ask(describe)
            except NucleusError:
                return
            if info is None:
                return
            try:
                _dumps(info)
            except (TypeError, ValueError) as exc:
                log.warning("module %r: describe() is not JSON: %s", handle.id, exc)
                return
            infos[handle.id] = info

    async with trio.open_nursery() as nursery:
        for handle in host.engine.modules:
            if handle.state is ModuleState.RUNNING:
                nursery.start_soon(ask, handle)
    return infos


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> Response:
        return problem_response(exc, request.url.path)

    @app.exception_handler(NucleusError)
    async def on_engine_error(request: Request, exc: NucleusError) -> Response:
        ledger = str(request.path_params.get("ledger", ""))
        problem = problem_from_error(exc, ledger=ledger)
        if problem.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return problem_response(problem, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        allowed = _allowed_methods(app.router.routes, request.scope)
        if allowed and request.method not in allowed:
            # GET .../records/batch reaches GET .../records/{seq} (and fails its validation),
            # but the resource is the batch endpoint: POST only.
            return problem_response(
                Problem(
                    "method-not-allowed",
                    f"{request.method} is not allowed on {request.url.path}",
                    headers={"Allow": ", ".join(allowed)},
                ),
                request.url.path,
            )
        errors = exc.errors()
        for error in errors:
            if error.get("type") == "json_invalid":
                reason = (error.get("ctx") or {}).get("error", "cannot parse the body")
                return problem_response(
                    Problem("malformed-json", f"the body is not valid JSON: {reason}"),
                    request.url.path,
                )
        details = [
            {
                "path": ".".join(str(part) for part in error.get("loc", ())),
                "message": error.get("msg", ""),
                "type": error.get("type", ""),
            }
            for error in errors
        ]
        summary = "; ".join(f"{d['path']}: {d['message']}" for d in details)
        return problem_response(
            Problem("invalid-request", summary, errors=details), request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        slug = {400: "malformed-json", 404: "not-found", 405: "method-not-allowed"}.get(
            exc.status_code
        )
        if slug is None:
            body = {"type": "about:blank", "title": str(exc.detail), "status": exc.status_code}
            return Response(_dumps(body), exc.status_code, exc.headers, "application/problem+json")
        # FastAPI raises 400 only when the body does not parse (json.loads failed, e.g.
        # nesting deeper than the parser's recursion limit).
        detail = {
            "malformed-json": "the body could not be parsed as JSON (is it nested too deeply?)",
            "not-found": f"no route {request.url.path}",
            "method-not-allowed": f"{request.method} is not allowed on {request.url.path}",
        }.get(slug, str(exc.detail))
        headers = exc.headers
        if slug == "method-not-allowed":
            # Starlette names the methods of the first route matching the path only; a path
            # served by several routes (GET and POST .../records) allows all of theirs.
            allowed = _allowed_methods(app.router.routes, request.scope)
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return problem_response(Problem(slug, detail, headers=headers), request.url.path)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        problem = Problem(
            "internal-error", f"{type(exc).__name__} while serving the request (see the log)"
        )
        return problem_response(problem, request.url.path)
