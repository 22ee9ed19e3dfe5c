"""Read authorisation (`reads = "token"`): reads need a bearer token too.

Writes are guarded by the app's write guard (the API token). With `reads = "token"`, every
`GET`/`HEAD` under `/v1/` and `/metrics` needs `Authorization: Bearer <token>` with the read
token or the API token; `/healthz`, `/readyz`, `/docs` and `/openapi.json` stay open (probes
and documentation).
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .host import DaemonState
from .problems import Problem, problem_response

__all__ = ["ReadGuard", "bearer_matches"]


def bearer_matches(header: str | None, *tokens: str | None) -> bool:
    """Whether an `Authorization` header carries one of `tokens` (constant-time compare)."""
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    value = given.strip().encode()
    found = False
    for token in tokens:
        if token is not None and hmac.compare_digest(value, token.encode()):
            found = True
    return found


def _is_read(path: str) -> bool:
    return path.startswith("/v1/") or path == "/metrics"


class ReadGuard:
    """ASGI middleware refusing unauthenticated reads when `state.reads == "token"`."""

    def __init__(self, app: ASGIApp, state: DaemonState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if (
            state.reads == "token"
            and scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and _is_read(scope["path"])
            and not bearer_matches(
                Headers(scope=scope).get("authorization"), state.read_token, state.token
            )
        ):
            problem = Problem(
                "unauthorized",
                "reads need the header 'Authorization: Bearer <token>' (reads = \"token\"): "
                "the read token or the API token",
                headers={"WWW-Authenticate": 'Bearer realm="nucleus"'},
            )
            await problem_response(problem, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)
