"""A full-duplex NDJSON upload to the stream route (what `nucleus append` uses for stdin).

httpx (like most HTTP clients) sends the whole request body before it reads the response; the
stream route answers while the body is still coming, so a long upload through such a client
would buffer every answer in the server's socket until the end (and a pipe with no end would
never see one). This client writes the body from one thread (chunked transfer encoding) while
the calling thread reads the answer lines as they arrive. Plain sockets and `ssl`: no server
framework, no trio.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = ["UploadError", "upload_ndjson"]

_CHUNK: Final = 1 << 16


class UploadError(Exception):
    """The connection failed, or the daemon answered with an error status.

    Attributes:
        status: the HTTP status (0 when the connection itself failed).
        headers: the response headers (lowercase names).
        body: the response body (the problem object's bytes), or b"".
    """

    def __init__(
        self, message: str, *, status: int = 0, headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body = body


class _Reader:
    """Buffered reads of one socket: lines and exact byte counts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(_CHUNK)
        if not data:
            return False
        self.buffer += data
        return True

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise UploadError("the daemon closed the connection mid-answer")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise UploadError("the daemon closed the connection mid-answer")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def rest(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _connect(url: str, timeout: float, context: ssl.SSLContext | None) -> tuple[socket.socket, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UploadError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        if parts.scheme == "https":
            context = context or ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=parts.hostname)
    except OSError as exc:
        raise UploadError(f"cannot connect to {parts.hostname}:{port}: {exc}") from exc
    return sock, parts.netloc


def upload_ndjson(
    url: str,
    path: str,
    chunks: Iterable[bytes],
    on_line: Callable[[dict[str, Any]], None],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
    context: ssl.SSLContext | None = None,
) -> None:
    """POST `chunks` (NDJSON bytes, any split) to `url + path`, calling `on_line` with each
    answer line as it arrives; returns after the daemon's last line.

    Args:
        url: the daemon's base URL (`http://...` or `https://...`).
        path: the stream route, e.g. `/v1/ledgers/main/records/stream`.
        chunks: the body, produced lazily (read from a pipe, say) by a sender thread.
        on_line: called in the calling thread, in order, with each parsed answer line.
        headers: extra request headers (`Authorization`).
        timeout: socket timeout in seconds (connect, and silence while waiting for answers).
        context: the TLS context for https (default: the system's trust store).

    Raises:
        UploadError: connection failure, an error status (with its body), or a broken answer.
        Exception: whatever iterating `chunks` raised (the upload is abandoned).
    """
    sock, netloc = _connect(url, timeout, context)
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {netloc}",
        "Content-Type: application/x-ndjson",
        "Transfer-Encoding: chunked",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    failure: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            for chunk in chunks:
                if chunk:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the daemon answered early (an error) or went away: the reader reports it
        except BaseException as exc:  # the input failed: stop the upload
            failure.append(exc)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    sender = threading.Thread(target=send, name="nucleus-upload", daemon=True)
    with sock:
        sender.start()
        try:
            _read_answer(_Reader(sock), on_line)
        except OSError as exc:
            if failure:
                raise failure[0] from None
            raise UploadError(f"the connection broke: {exc}") from exc
        except UploadError:
            if failure:
                raise failure[0] from None
            raise
        finally:
            sender.join(timeout)
    if failure:
        raise failure[0]


def _read_answer(reader: _Reader, on_line: Callable[[dict[str, Any]], None]) -> None:
    status_line = reader.line().decode("latin-1")
    try:
        status = int(status_line.split(" ", 2)[1])
    except (IndexError, ValueError):
        raise UploadError(f"not an HTTP answer: {status_line[:100]!r}") from None
    response_headers: dict[str, str] = {}
    while line := reader.line():
        name, _, value = line.decode("latin-1").partition(":")
        response_headers[name.strip().lower()] = value.strip()
    chunked = "chunked" in response_headers.get("transfer-encoding", "").lower()
    if status != 200:
        if chunked:
            body = b"".join(_chunks(reader))
        elif "content-length" in response_headers:
            body = reader.exactly(int(response_headers["content-length"]))
        else:
            body = reader.rest()
        raise UploadError(
            f"the daemon answered {status}", status=status, headers=response_headers, body=body
        )
    pending = b""
    pieces = _chunks(reader) if chunked else iter([reader.rest()])
    for piece in pieces:
        pending += piece
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            if raw.strip():
                on_line(json.loads(raw))
    if pending.strip():
        on_line(json.loads(pending))


def _chunks(reader: _Reader) -> Iterable[bytes]:
    while True:
        size_line = reader.line().split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise UploadError(f"broken chunked answer: {size_line[:40]!r}") from None
        if size == 0:
            while reader.line():  # trailers
                pass
            return
        yield reader.exactly(size)
        reader.exactly(2)
