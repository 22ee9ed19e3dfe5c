"""Logging for the daemon: one line per event on stderr, as text or as JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, Literal

__all__ = ["JsonFormatter", "configure_logging"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class JsonFormatter(_UTCFormatter):
    """One JSON object per line: `ts`, `level`, `logger`, `message` (+ `exception`)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as one line of JSON."""
        out = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(
    log_format: Literal["text", "json"] = "text", level: int | str = logging.INFO
) -> None:
    """Send every log record (the daemon's, the modules', the server's) to stderr.

    Replaces the root logger's handlers; `text` lines read
    `2025-01-01T12:00:00.000Z INFO nucleus_actors.daemon: listening on http://127.0.0.1:8470`.
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
    root.setLevel(level)
    # hypercorn logs "Running on ..." at INFO; the daemon logs "listening on ..." itself.
    logging.getLogger("nucleus_actors.daemon.http").setLevel(max(logging.WARNING, root.level))
