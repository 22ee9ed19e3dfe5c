"""Logging for the daemon: one line per event on stderr, as text or as JSON.

Lines written while a request is served carry its request id (`access.REQUEST_ID`): text
lines end with `[request_id=...]`, JSON lines have a `request_id` member. Access lines in JSON
carry their fields as members (`client`, `method`, `path`, `status`, `bytes`, `duration_ms`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Final, Literal

__all__ = ["JsonFormatter", "configure_logging", "set_level"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Defined here (not in `access`, which needs starlette) so that formatting needs no framework;
# `access.REQUEST_ID` is this same variable.
REQUEST_ID: ContextVar[str | None] = ContextVar("nucleus_request_id", default=None)


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = REQUEST_ID.get()
        return line if rid is None else f"{line} [request_id={rid}]"


class JsonFormatter(_UTCFormatter):
    """One JSON object per line: `ts`, `level`, `logger`, `message` (+ `request_id`, the
    access fields, `exception`)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        rid = REQUEST_ID.get()
        if rid is not None:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(
    log_format: Literal["text", "json"] = "text",
    level: int | str = logging.INFO,
    *,
    access_log: bool = True,
) -> None:
    """Send every log record (the daemon's, the modules', the server's) to stderr.

    Replaces the root logger's handlers; `text` lines read
    `2025-01-01T12:00:00.000Z INFO nucleus_actors.daemon: listening on http://127.0.0.1:8470`.
    `access_log=False` silences the access log (`nucleus_actors.daemon.access`).
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (
        JsonFormatter() if log_format == "json" else _UTCFormatter(TEXT_FORMAT)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("nucleus_actors.daemon.access").disabled = not access_log
    set_level(level)


def set_level(level: int | str) -> None:
    """Set the daemon's log level (also on SIGHUP reloads)."""
    root = logging.getLogger()
    root.setLevel(level)
    # hypercorn logs "Running on ..." at INFO; the daemon logs "listening on ..." itself.
    logging.getLogger("nucleus_actors.daemon.http").setLevel(max(logging.WARNING, root.level))
