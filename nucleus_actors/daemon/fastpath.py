"""The single-record append without the framework: `POST /v1/ledgers/{ledger}/records`.

FastAPI's per-request work (routing, dependency solving, pydantic validation, the response
class) costs more than the append itself, so this ASGI middleware serves the **successful**
case of that one route directly. It sits innermost among the app's middlewares: every guard in
front of it (token, body size, media type, and whatever else the app adds) has already passed.

Anything unusual is handed to the FastAPI route unchanged, so the OpenAPI schema, validation
errors and problem bodies stay exactly the route's: a body that is not a plain record object
(per `RecordIn`'s strict rules), a record that `Record` refuses, an unknown or unavailable
ledger, any header that changes the route's behaviour (`Idempotency-Key`). Only the engine's
own errors are answered here, the way the app's `NucleusError` handler answers them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _jcs
from ..errors import NucleusError
from ..record import Record
from .host import DaemonState
from .problems import problem_from_error, problem_response

__all__ = ["FastAppend"]

log = logging.getLogger("nucleus_actors.daemon.http")

_ROUTE: Final = re.compile(r"/v1/ledgers/([^/]+)/records")
_RECORD_KEYS: Final = frozenset({"kind", "payload", "meta"})
_BYPASS_HEADERS: Final = frozenset({b"idempotency-key"})
"""Headers that make the route do more than append: such requests go to the route."""
_EMPTY: Final[dict[str, str]] = {}

# The parser the route uses for bodies: I-JSON (duplicate member names refused, a
# `ValueError`) where `_jcs.loads` exists, else `json.loads`. Whatever the route would refuse
# must fall back to it, so both parse alike.
loads: Callable[[bytes], Any] = getattr(_jcs, "loads", json.loads)


def parse_record(body: bytes) -> Record | None:
    """The `Record` of a single-append body, or None when the route must decide.

    None whenever `RecordIn` (strict: `kind` a string, `payload` present, `meta` an object of
    strings, no other member) or `Record` would refuse the body, or it is not JSON: the route
    then answers with its own error, exactly as without this fast path.
    """
    try:
        value = loads(body)
    except (ValueError, RecursionError):
        return None
    return record_from_value(value)


def record_from_value(value: Any) -> Record | None:
    """`parse_record` for a body already parsed (by `loads`)."""
    if type(value) is not dict or "kind" not in value or "payload" not in value:
        return None
    if len(value) > 2 and not value.keys() <= _RECORD_KEYS:
        return None
    kind = value["kind"]
    if type(kind) is not str:
        return None
    meta = value.get("meta", _EMPTY)
    if type(meta) is not dict:
        return None
    for key, item in meta.items():
        if type(item) is not str or type(key) is not str:
            return None
    try:
        return Record(kind, value["payload"], meta)
    except (NucleusError, ValueError, TypeError, RecursionError):
        return None


class FastAppend:
    """ASGI middleware answering successful single appends; everything else passes through.

    Args:
        app: the rest of the application (FastAPI's exception middleware and router).
        state: the daemon's ledgers.
        parse: body -> Record or None (default `parse_record`).
    """

    def __init__(
        self,
        app: ASGIApp,
        state: DaemonState,
        parse: Callable[[bytes], Record | None] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.parse = parse_record if parse is None else parse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _ROUTE.fullmatch(scope["path"])
        if match is None or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        for name, _ in scope["headers"]:
            if name in _BYPASS_HEADERS:
                await self.app(scope, receive, send)
                return
        host = self.state.hosts.get(match.group(1))
        message = await receive()
        body = message.get("body", b"")
        if message.get("more_body", False) or message["type"] != "http.request":
            # not the guard's single replayed message: let the route read the rest
            await self.app(scope, _Replay(message, receive), send)
            return
        record = (
            None if host is None or not host.serving or host.role == "standby" else self.parse(body)
        )
        if record is None:
            await self.app(scope, _Replay(message, receive), send)
            return
        assert host is not None
        ledger = host.id
        try:
            receipt = await host.engine.append(record)
        except NucleusError as exc:
            problem = problem_from_error(exc, ledger=ledger)
            if problem.status >= 500:
                log.warning("%s %s: %s", scope["method"], scope["path"], exc)
            await problem_response(problem, scope["path"])(scope, receive, send)
            return
        content = b'{"seq":%d,"hash":"%s","timestamp":%d}' % (
            receipt.seq,
            receipt.hash.hex().encode(),
            receipt.timestamp,
        )
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-length", b"%d" % len(content)),
                    (b"content-type", b"application/json"),
                    (b"location", b"/v1/ledgers/%s/records/%d" % (ledger.encode(), receipt.seq)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": content})


class _Replay:
    """A `receive` that first returns one already-received message."""

    __slots__ = ("_message", "_receive")

    def __init__(self, message: Message, receive: Receive) -> None:
        self._message: Message | None = message
        self._receive = receive

    async def __call__(self) -> Message:
        message = self._message
        if message is not None:
            self._message = None
            return message
        return await self._receive()
