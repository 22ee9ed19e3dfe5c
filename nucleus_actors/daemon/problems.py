"""RFC 9457 problem details: every error the HTTP API answers, and how errors map to them.

Each answer is `application/problem+json`:
`{"type", "title", "status", "detail", "instance", ...extensions}`. `type` is
`tag:nucleus-actors,2025:problem/<slug>`; docs/daemon.md lists every slug.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from starlette.responses import Response

from ..errors import (
    Fenced,
    IdempotencyConflict,
    IntegrityError,
    InvalidRecord,
    LifecycleError,
    ModuleError,
    NucleusError,
    RecordRejected,
    StorageError,
)

__all__ = [
    "PROBLEM_TYPE_PREFIX",
    "PROBLEMS",
    "Problem",
    "problem_bytes",
    "problem_from_error",
    "problem_response",
]

PROBLEM_TYPE_PREFIX: Final = "tag:nucleus-actors,2025:problem/"
"""Every problem `type` is this prefix followed by a slug from `PROBLEMS`."""

PROBLEMS: Final[Mapping[str, tuple[int, str]]] = {
    "malformed-json": (400, "Malformed JSON"),
    "bad-request": (400, "Bad request"),
    "unauthorized": (401, "Missing or wrong token"),
    "not-found": (404, "Not found"),
    "unknown-ledger": (404, "Unknown ledger"),
    "unknown-seq": (404, "No entry at this seq"),
    "no-checkpoint": (404, "The ledger signs no checkpoints"),
    "method-not-allowed": (405, "Method not allowed"),
    "request-timeout": (408, "Request too slow"),
    "record-rejected": (409, "Record rejected by a module"),
    "idempotency-key-in-flight": (409, "Idempotency key in flight"),
    "body-too-large": (413, "Request body too large"),
    "batch-too-large": (413, "Too many records in a batch"),
    "unsupported-media-type": (415, "Unsupported media type"),
    "misdirected-request": (421, "Host not served here"),
    "invalid-request": (422, "Invalid request"),
    "invalid-record": (422, "Invalid record"),
    "idempotency-key-reused": (422, "Idempotency key reused"),
    "header-too-large": (431, "Request header fields too large"),
    "integrity-error": (500, "Stored chain does not verify"),
    "internal-error": (500, "Internal error"),
    "module-failed": (503, "A module failed"),
    "ledger-unavailable": (503, "Ledger unavailable"),
    "storage-unavailable": (503, "Storage unavailable"),
    "not-writer": (503, "Not the writer of this ledger"),
    "not-ready": (503, "Not ready"),
    "daemon-stopping": (503, "Daemon stopping"),
    "server-busy": (503, "Server busy"),
}
"""slug -> (status, title) of every problem the API answers."""

RETRY_AFTER_SECONDS: Final = 1
"""`Retry-After` sent with every 503."""


class Problem(Exception):
    """An error answer of the HTTP API, raised by a route and rendered by the app.

    Args:
        slug: a key of `PROBLEMS` (it fixes the status and title).
        detail: what happened in this occurrence, for humans.
        headers: extra response headers (a 503 always gets `Retry-After`).
        **extensions: extra members of the problem object (`ledger`, `module`, `seq`, ...);
            those that are None are left out.
    """

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        if slug not in PROBLEMS:
            raise ValueError(f"unknown problem slug {slug!r}")
        super().__init__(detail)
        self.slug = slug
        self.status, self.title = PROBLEMS[slug]
        self.detail = detail
        self.headers = dict(headers or {})
        if self.status == 503:
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        self.extensions = extensions

    def body(self, instance: str) -> dict[str, Any]:
        """The problem object for a request to `instance` (the request path)."""
        return {
            "type": PROBLEM_TYPE_PREFIX + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
            **{key: value for key, value in self.extensions.items() if value is not None},
        }


def problem_bytes(problem: Problem, instance: str) -> bytes:
    """The UTF-8 JSON of `problem`'s body. Text that is not valid Unicode (a lone surrogate
    quoted from the request) is spelled out as the six characters `\\udXXX` instead of
    failing the answer."""
    body = problem.body(instance)
    try:
        return json.dumps(body, ensure_ascii=False, default=str).encode()
    except UnicodeEncodeError:
        return json.dumps(_spelled(body), ensure_ascii=False, default=str).encode()


def _spelled(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {_spelled(key): _spelled(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_spelled(item) for item in value]
    return value


def problem_response(problem: Problem, instance: str) -> Response:
    """Render `problem` as an `application/problem+json` response."""
    content = problem_bytes(problem, instance)
    return Response(
        content,
        status_code=problem.status,
        headers=problem.headers,
        media_type="application/problem+json",
    )


def problem_from_error(exc: NucleusError, *, ledger: str) -> Problem:
    """The answer for an error the engine raised while serving `ledger`.

    `RecordRejected` -> 409, `InvalidRecord` -> 422, any other `ModuleError` -> 503 (the
    module crashed, timed out or is unavailable), `LifecycleError` (stopping, failed, closed)
    -> 503, `IntegrityError` -> 500, any other `StorageError` -> 503.
    """
    if isinstance(exc, RecordRejected):
        return Problem(
            "record-rejected",
            str(exc),
            ledger=ledger,
            module=exc.module_id,
            reason=exc.reason,
            index=exc.index,
            # a json-schema rejection (SchemaViolation) says where and which keyword
            path=getattr(exc, "path", None),
            schema_path=getattr(exc, "schema_path", None),
        )
    if isinstance(exc, IdempotencyConflict):
        slug = "idempotency-key-in-flight" if exc.in_flight else "idempotency-key-reused"
        return Problem(slug, str(exc), ledger=ledger, key=exc.key)
    if isinstance(exc, InvalidRecord):
        return Problem("invalid-record", str(exc), ledger=ledger, path=exc.path)
    if isinstance(exc, ModuleError):
        cause = exc.__cause__
        return Problem(
            "module-failed",
            str(exc),
            ledger=ledger,
            module=exc.module_id,
            cause=None if cause is None else f"{type(cause).__name__}: {cause}",
        )
    if isinstance(exc, LifecycleError):
        phase = exc.phase
        return Problem(
            "ledger-unavailable",
            str(exc),
            ledger=ledger,
            phase=None if phase is None else str(phase),
        )
    if isinstance(exc, IntegrityError):
        return Problem("integrity-error", str(exc), ledger=ledger, seq=exc.seq)
    if isinstance(exc, Fenced):
        return Problem("not-writer", str(exc), ledger=ledger, role="standby", epoch=exc.current)
    if isinstance(exc, StorageError):
        return Problem("storage-unavailable", str(exc), ledger=ledger)
    return Problem("internal-error", f"{type(exc).__name__}: {exc}", ledger=ledger)
