"""Request ids and the access log: the outermost ASGI layer of the daemon.

Every HTTP request gets a request id: the client's `X-Request-Id` when it is 1..128 printable
ASCII characters (no spaces), else a fresh one (32 hex digits). It is returned in the
response's `X-Request-Id` header and attached to every log line written while the request is
served (`REQUEST_ID`, a context variable that `logs.configure_logging`'s formatters read).

When the access log is on (the default; `access_log = false` or `--no-access-log` turns it
off), one INFO line per request goes to the `nucleus_actors.daemon.access` logger: client,
method, path, status, body bytes sent, duration and request id. In the JSON log format these
are separate members (`client`, `method`, `path`, `status`, `bytes`, `duration_ms`,
`request_id`).
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from contextvars import ContextVar
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs
from .guards import REQUEST_ID_SET

__all__ = ["REQUEST_ID", "AccessLog", "request_id_from"]

REQUEST_ID: ContextVar[str | None] = logs.REQUEST_ID
"""The id of the request being served by the current task (None outside requests)."""

access_log = logging.getLogger("nucleus_actors.daemon.access")

_VALID_ID: Final = re.compile(rb"[\x21-\x7e]{1,128}")
_HEADER: Final = b"x-request-id"


_PREFIX: Final = secrets.token_hex(8)
_counter = itertools.count(1)


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's own `X-Request-Id` if valid (1..128 printable ASCII, no spaces), else a
    new id: 32 hex digits, a random per-process prefix and a counter (unique, cheap to make;
    not a secret)."""
    for name, value in headers:
        if name == _HEADER:
            if _VALID_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return f"{_PREFIX}{next(_counter):016x}"


class AccessLog:
    """ASGI middleware: request id in, request id out, one access line per request.

    Args:
        app: the application.
        enabled: write the access lines (request ids are handled either way).
    """

    def __init__(self, app: ASGIApp, *, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_from(scope["headers"])
        # inner layers (the app's RequestId) see the same id
        headers = [(k, v) for k, v in scope["headers"] if k != _HEADER]
        state = {**scope.get("state", {}), "request_id": rid}
        scope = {
            **scope,
            "headers": [*headers, (_HEADER, rid.encode("ascii"))],
            "state": state,
            REQUEST_ID_SET: True,  # the app's RequestId layer has nothing left to do
        }
        token = REQUEST_ID.set(rid)
        header = (_HEADER, rid.encode("ascii"))
        status = 0
        sent = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                given = message.get("headers", ())
                if not any(name == _HEADER for name, _ in given):
                    message = {**message, "headers": [*given, header]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            if self.enabled:
                self._log(scope, status, sent, time.perf_counter() - start, rid)
            REQUEST_ID.reset(token)

    @staticmethod
    def _log(scope: Scope, status: int, sent: int, seconds: float, rid: str) -> None:
        client = scope.get("client")
        where = f"{client[0]}:{client[1]}" if client else "-"
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        target = path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        fields: dict[str, Any] = {
            "client": where,
            "method": scope["method"],
            "path": target,
            "status": status,
            "bytes": sent,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": rid,
        }
        access_log.info(
            '%s "%s %s" %d %dB %.1fms',
            where,
            scope["method"],
            target,
            status,
            sent,
            seconds * 1000,
            extra={"access": fields},
        )
