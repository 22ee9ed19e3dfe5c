"""`POST /v1/ledgers/{ledger}/records/stream`: NDJSON records in, NDJSON receipts out.

Full duplex: the response starts at once and each input line gets its answer line, in order,
as soon as its record is durable, while the client is still sending. Three tasks share one
request:

```
reader    receive() -> split lines -> parse -> [items channel, bounded]
appender  items -> engine.append_each(group) -> [outcomes channel, bounded]
writer    outcomes -> receipt / problem lines -> send()
```

Answer lines: `{"line": n, "seq", "hash", "timestamp"}` for an appended record, or a problem
object (RFC 9457 members) with `"line"` for a refused one (bad JSON, an invalid record, a veto,
a failed module); then one `{"summary": {"appended", "failed"}}` (and `"replayed"` when some
lines were replays).

A line may carry `"idempotency_key"` (1..255 printable ASCII characters) beside `kind`,
`payload` and `meta`: the record's own key, with the `Idempotency-Key` header's semantics
(engine `append_each_keyed`). A key already committed for the same record answers the first
receipt with `"replayed": true` and appends nothing; a key used for a different record is an
`idempotency-key-reused` (422) line, a key in flight an `idempotency-key-in-flight` (409) line.
So a stream cut mid-way is resumed by sending every line again with the same keys. Blank lines
are skipped (they still count for line numbers). Memory stays bounded whatever the body's size:
lines longer than `max_body_bytes` are answered with an error and skipped, and the channels hold
at most a few groups. If the client goes away, no further group is submitted; the group in
flight completes (stored records stay stored; they were just not acknowledged).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from fastapi import FastAPI
from fastapi import Path as PathParam
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..errors import NucleusError
from ..record import Receipt, Record
from . import fastpath
from .fastpath import parse_record, record_from_value
from .host import DaemonState, LedgerHost
from .problems import Problem, problem_from_error

if TYPE_CHECKING:
    from ..engine import LedgerEngine

__all__ = ["MEDIA_TYPE", "StreamResponse", "install_stream_route", "media_problem", "stream_path"]

log = logging.getLogger("nucleus_actors.daemon.http")

MEDIA_TYPE: Final = "application/x-ndjson"
"""What the stream route reads and writes (`application/jsonl` is accepted too)."""
ACCEPTED_TYPES: Final = frozenset({MEDIA_TYPE, "application/jsonl"})
GROUP: Final = 1024
"""A group handed to one `append_each` stops growing at this many records (the pipeline's
default batch; the lines of one received chunk stay together, so a group may hold more)."""
QUEUE_CHUNKS: Final = 16
"""Received chunks of parsed lines waiting for the appender (bounds memory together with
the server's read size and `max_body_bytes`)."""


def stream_path(path: str) -> bool:
    """Whether `path` is the stream route (the write guard lets its body through unread)."""
    return path.startswith("/v1/ledgers/") and path.endswith("/records/stream")


def media_problem(content_type: str | None) -> Problem | None:
    """The 415 for a stream request that does not declare NDJSON, else None."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in ACCEPTED_TYPES:
        return None
    return Problem(
        "unsupported-media-type",
        f"send NDJSON (one record object per line) with 'Content-Type: {MEDIA_TYPE}', "
        f"got {content_type!r}",
    )


def _line_problem(problem: Problem, line: int, instance: str) -> bytes:
    body = problem.body(instance)
    return (json.dumps({"line": line, **body}, ensure_ascii=False, default=str) + "\n").encode()


def _explain(raw: bytes, ledger: str) -> Problem:
    """The problem for a line `parse_record` refused: what the single-append route says."""
    try:
        value = fastpath.loads(raw)
    except (ValueError, RecursionError) as exc:
        try:
            json.loads(raw)
        except (ValueError, RecursionError):
            return Problem("malformed-json", f"the line is not valid JSON: {exc}")
        return Problem("invalid-request", str(exc))  # JSON, but not I-JSON (duplicate names)
    from .app import RecordIn  # the route's own model: the same rules, the same messages

    try:
        item = RecordIn.model_validate(value)
    except ValidationError as exc:
        details = [
            {
                "path": ".".join(str(part) for part in error.get("loc", ())),
                "message": error.get("msg", ""),
                "type": error.get("type", ""),
            }
            for error in exc.errors(include_url=False)
        ]
        summary = "; ".join(f"{d['path']}: {d['message']}" for d in details)
        return Problem("invalid-request", summary or "not a record object", errors=details)
    try:
        item.record()
    except NucleusError as exc:
        return problem_from_error(exc, ledger=ledger)
    except (ValueError, TypeError, RecursionError) as exc:
        return Problem("invalid-record", str(exc))
    return Problem("invalid-request", "the line is not a record object")  # pragma: no cover


class _Item:
    __slots__ = ("key", "line", "problem", "record")

    def __init__(
        self, line: int, record: Record | None, problem: Problem | None, key: str | None = None
    ) -> None:
        self.line = line
        self.record = record
        self.problem = problem
        self.key = key  # the line's idempotency_key


KEY_MEMBER: Final = "idempotency_key"
"""A line's optional member: the record's own idempotency key (resuming a cut stream)."""


def _valid_key(key: object) -> bool:
    return isinstance(key, str) and 0 < len(key) <= 255 and all(" " < c <= "~" for c in key)


class StreamResponse(Response):
    """Runs the three tasks of one stream request (see the module docstring)."""

    def __init__(self, state: DaemonState, host: LedgerHost, request: Request) -> None:
        super().__init__(status_code=200, media_type=MEDIA_TYPE)
        self.state = state
        self.host = host
        self.line_limit = state.max_body_bytes
        self.instance = request.url.path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        engine = self.host.engine
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", MEDIA_TYPE.encode()),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        items_in, items_out = trio.open_memory_channel[list[_Item]](QUEUE_CHUNKS)
        done_in, done_out = trio.open_memory_channel[list[bytes]](4)
        counts = [0, 0, 0]  # appended, failed, replayed
        disconnected = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, receive, items_in, disconnected)
            nursery.start_soon(self._append, engine, items_out, done_in, counts, disconnected)
            await self._write(send, done_out, disconnected)
        if not disconnected.is_set():
            totals = {"appended": counts[0], "failed": counts[1]}
            if counts[2]:
                totals["replayed"] = counts[2]  # lines answered with an earlier receipt
            summary = {"summary": totals}
            await send(
                {
                    "type": "http.response.body",
                    "body": (json.dumps(summary) + "\n").encode(),
                    "more_body": False,
                }
            )

    async def _read(
        self,
        receive: Receive,
        items: trio.MemorySendChannel[list[_Item]],
        disconnected: trio.Event,
    ) -> None:
        """Split the body into lines as it arrives; parse each into a record or a problem.

        The lines of one received chunk travel together (one channel send per chunk)."""
        limit = self.line_limit
        number = 0
        buffer = b""
        skipping = False  # inside a line that is over the limit: drop up to its newline
        async with items:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return
                chunk = message.get("body", b"")
                more = message.get("more_body", False)
                parsed: list[_Item] = []
                if chunk:
                    lines = (buffer + chunk).split(b"\n")
                    buffer = lines.pop()
                    for raw in lines:
                        number += 1
                        if skipping:
                            skipping = False
                            continue
                        if raw.strip():
                            parsed.append(self._parse(number, raw))
                    if skipping:
                        buffer = b""  # still inside the long line
                    elif len(buffer) > limit:
                        problem = Problem(
                            "body-too-large",
                            f"line {number + 1} is over max_body_bytes={limit} (skipped)",
                            limit=limit,
                        )
                        parsed.append(_Item(number + 1, None, problem))
                        buffer = b""
                        skipping = True
                if not more and buffer.strip() and not skipping:
                    parsed.append(self._parse(number + 1, buffer))
                if parsed:
                    await items.send(parsed)
                if not more:
                    return

    def _parse(self, number: int, raw: bytes) -> _Item:
        if b'"idempotency_key"' not in raw:  # the common case: a plain record object
            record = parse_record(raw)
            if record is not None:
                return _Item(number, record, None)
            return _Item(number, None, _explain(raw, self.host.id))
        try:
            value = fastpath.loads(raw)
        except (ValueError, RecursionError):
            return _Item(number, None, _explain(raw, self.host.id))
        if type(value) is not dict or KEY_MEMBER not in value:
            return self._parse_plain(number, raw, value)
        key = value.pop(KEY_MEMBER)
        if not _valid_key(key):
            shown = key[:300] if isinstance(key, str) else key
            problem = Problem(
                "bad-request",
                f"{KEY_MEMBER} must be 1..255 printable ASCII characters, got {shown!r}",
            )
            return _Item(number, None, problem)
        # The record is the line without its key: checked exactly as a line without one.
        return self._parse_plain(number, None, value, key)

    def _parse_plain(
        self, number: int, raw: bytes | None, value: Any, key: str | None = None
    ) -> _Item:
        record = record_from_value(value)
        if record is not None:
            return _Item(number, record, None, key)
        if raw is None:
            raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return _Item(number, None, _explain(raw, self.host.id))

    async def _append(
        self,
        engine: LedgerEngine,
        items: trio.MemoryReceiveChannel[list[_Item]],
        done: trio.MemorySendChannel[list[bytes]],
        counts: list[int],
        disconnected: trio.Event,
    ) -> None:
        """Hand whatever lines are parsed to `append_each`, a group at a time, in order."""
        ledger = self.host.id
        instance = self.instance
        async with items, done:
            async for group in items:
                while len(group) < GROUP:
                    try:
                        group.extend(items.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                appending = [item for item in group if item.record is not None]
                records = [item.record for item in appending if item.record is not None]
                outcomes: list[Receipt | tuple[Receipt, bool] | NucleusError] = []
                if records:
                    try:
                        if any(item.key is not None for item in appending):
                            keys = [item.key for item in appending]
                            outcomes = list(await engine.append_each_keyed(records, keys))
                        else:
                            outcomes = list(await engine.append_each(records))
                    except NucleusError as exc:  # the ledger stopped: every record fails
                        outcomes = [exc] * len(records)
                lines: list[bytes] = []
                results = iter(outcomes)
                for item in group:
                    if item.record is None:
                        assert item.problem is not None
                        counts[1] += 1
                        lines.append(_line_problem(item.problem, item.line, instance))
                        continue
                    outcome = next(results)
                    replayed = False
                    if isinstance(outcome, tuple):
                        outcome, replayed = outcome
                    if isinstance(outcome, Receipt):
                        counts[2 if replayed else 0] += 1
                        lines.append(
                            b'{"line":%d,"seq":%d,"hash":"%s","timestamp":%d%s}\n'
                            % (
                                item.line,
                                outcome.seq,
                                outcome.hash.hex().encode(),
                                outcome.timestamp,
                                b',"replayed":true' if replayed else b"",
                            )
                        )
                    else:
                        counts[1] += 1
                        problem = problem_from_error(outcome, ledger=ledger)
                        lines.append(_line_problem(problem, item.line, instance))
                if disconnected.is_set():
                    return
                await done.send(lines)

    async def _write(
        self, send: Send, done: trio.MemoryReceiveChannel[list[bytes]], disconnected: trio.Event
    ) -> None:
        async with done:
            async for lines in done:
                if disconnected.is_set():
                    continue
                await send(
                    {"type": "http.response.body", "body": b"".join(lines), "more_body": True}
                )


def install_stream_route(
    app: FastAPI,
    state: DaemonState,
    serving: Callable[[str], tuple[LedgerHost, Any]],
    security: list[Any],
    problems: dict[int | str, dict[str, Any]],
) -> None:
    """Add the stream route to `app` (called by `create_app`)."""

    @app.post(
        "/v1/ledgers/{ledger}/records/stream",
        response_class=StreamResponse,
        status_code=200,
        dependencies=security,
        responses={
            200: {
                "content": {
                    MEDIA_TYPE: {
                        # NDJSON: each array item is one line
                        "schema": {"type": "array", "items": {"type": "object"}},
                    }
                },
                "description": "One answer line per input line, in order: a receipt "
                '`{"line", "seq", "hash", "timestamp"}` once the record is durable (with '
                '`"replayed": true` when the line\'s `idempotency_key` was already committed '
                'for it), or a problem object with `"line"`; then `{"summary": {"appended", '
                '"failed"}}` (and `"replayed"`, a count, when some lines were replays).',
            },
            **problems,
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    MEDIA_TYPE: {
                        # NDJSON: each array item is one line
                        "schema": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/StreamRecordIn"},
                        },
                        "example": '{"kind": "order.created", "payload": {"id": 1}}\n',
                    }
                },
                "description": "NDJSON: one record object (`{kind, payload, meta?}`) per line, "
                "optionally with its own `idempotency_key` (see `StreamRecordIn`).",
            }
        },
        summary="Append records one by one from an NDJSON stream (full duplex)",
    )
    async def append_stream(
        request: Request, ledger: str = PathParam(description="ledger id")
    ) -> Response:
        host, _ = serving(ledger)
        return StreamResponse(state, host, request)
