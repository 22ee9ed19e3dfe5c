"""ASGI guards in front of the API: Host check, request ids, admission (stopping, body deadline,
byte budget) and the limits they enforce.

```
request ─> RequestId ─> HostCheck ─> Admission ─> app's own guard (token, size, type) ─> routes
```

- `HostCheck` answers 421 to a `Host` that is not in `allowed_hosts` (DNS rebinding: a web
  page a user visits must not reach a daemon on loopback), 400 to a missing or malformed one.
- `RequestId` echoes a valid `X-Request-Id` (1..128 printable ASCII characters) or makes one.
- `Admission` decides which requests the daemon takes on: once stopping, a new write gets
  503 and `Connection: close`; a request body must arrive completely within `read_timeout`
  (else 408); large bodies share a byte budget (`body_budget_bytes`) so that concurrent big
  batches cannot multiply the daemon's memory; and it tells the connection layer
  (`connections`) when a request is *admitted* (the app may act on it: it must be answered,
  the connection is never shed or closed under it).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import Problem, problem_response

if TYPE_CHECKING:
    from .host import DaemonState

__all__ = [
    "CONNECTION_KEY",
    "SMALL_BODY_BYTES",
    "check_batch_size",
    "checked_key",
    "Admission",
    "ByteBudget",
    "HostAllowList",
    "HostCheck",
    "HttpLimits",
    "RateLimitedLog",
    "RequestId",
    "valid_request_id",
    "REQUEST_ID_SET",
]

log = logging.getLogger("nucleus_actors.daemon.http")

CONNECTION_KEY: Final = "nucleus.connection"
"""Key of the connection-state entry (ASGI `scope["state"]`) holding the `Tracked` connection
that carries the request, when the daemon's own connection layer serves it."""

SMALL_BODY_BYTES: Final = 64 << 10
"""Bodies up to this size (by `Content-Length`) do not draw on the byte budget: a small
append never waits behind large batches."""

REQUEST_ID_MAX: Final = 128
"""Longest `X-Request-Id` echoed back; a longer or non-printable one is replaced."""

_HEALTH_PATHS: Final = frozenset({"/healthz", "/readyz"})
_NAME: Final = re.compile(r"[a-z0-9._-]+")  # a DNS name or IPv4 address, lowercased


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpLimits:
    """The HTTP-level limits of a daemon (all from the configuration, see docs/daemon.md)."""

    read_timeout: float = 10.0
    """Seconds a client has to send a request's head, and again its whole body."""
    max_connections: int = 1000
    """Most connections served at once (also kept below the process's file limit)."""
    max_batch_records: int = 1000
    """Most records in one batch append."""
    body_budget_bytes: int = 8 << 20
    """Bytes of large request bodies (over 64 KiB each) being read or processed at once."""
    stall_timeout: float = 30.0
    """`/readyz` reports a ledger whose appends made no progress for this long."""
    allowed_hosts: tuple[str, ...] | None = None
    """`Host` values accepted (`name` or `name:port`; `*` accepts any); None = the defaults
    (the bind address, `localhost`, `127.0.0.1`, `[::1]`, each with the port)."""


class Tracked(Protocol):
    """What the connection layer exposes to `Admission` about a connection."""

    def admit(self) -> bool:
        """Admit the request on this connection (never shed or close it under it); False when
        the connection is already being closed: then the request must not be acted on."""


# -- small tools -----------------------------------------------------------------------------
class RateLimitedLog:
    """Logs a warning at most once per `interval` seconds, counting what it held back."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held = 0

    def warning(self, message: str, *args: object) -> bool:
        """Log `message % args` unless one was logged less than `interval` ago; True if
        logged."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return False
        held, self._held = self._held, 0
        suffix = f" ({held} more since the last report)" if held else ""
        self._log.warning(message + suffix, *args)
        self._next = now + self._interval
        return True


class ByteBudget:
    """A byte semaphore shared by concurrent large request bodies (first come, first served).

    `acquire(n)` waits until `n` bytes fit (a request larger than the whole budget takes all
    of it); `release(n)` gives them back.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a byte budget needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        """Bytes available in all."""
        self.used = 0
        """Bytes held right now."""
        self._queue = trio.Lock()  # FIFO: a big request is not starved by small ones
        self._room = trio.lowlevel.ParkingLot()

    def clamp(self, size: int) -> int:
        """What a request of `size` bytes holds (at most the whole budget)."""
        return min(size, self.capacity)

    async def acquire(self, size: int) -> int:
        """Wait until `size` bytes (clamped) fit, take them and return how many were taken.

        Cancellation: nothing is held if it is cancelled while waiting.
        """
        size = self.clamp(size)
        async with self._queue:
            while self.used + size > self.capacity:
                await self._room.park()
            self.used += size
        return size

    def release(self, size: int) -> None:
        """Give back bytes taken by `acquire`."""
        self.used -= size
        self._room.unpark_all()


def valid_request_id(value: str | None) -> bool:
    """True for 1..128 printable ASCII characters (space to `~`)."""
    return (
        value is not None
        and 0 < len(value) <= REQUEST_ID_MAX
        and value.isascii()
        and value.isprintable()  # for ASCII: space to "~"
    )


# -- Host ------------------------------------------------------------------------------------
def _split_host(value: str) -> tuple[str, int | None] | None:
    """`("name", port)` of a Host header or `allowed_hosts` entry; None when malformed."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[: end + 1], value[end + 1 :]
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
        if not rest:
            return name, None
        if not rest.startswith(":"):
            return None
        port_text = rest[1:]
    else:
        name, sep, port_text = value.partition(":")
        if _NAME.fullmatch(name) is None or ":" in port_text:
            return None
        if not sep:
            return name, None
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        return None
    port = int(port_text)
    return (name, port) if port <= 65535 else None


class HostAllowList:
    """The `Host` values a daemon answers (`allowed_hosts`).

    An entry `name:port` matches exactly; a bare `name` matches it on any port; `*` matches
    everything. Names compare case-insensitively; a Host without a port means port 80 (443
    over TLS).
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        """The entries as given."""
        self.any = "*" in self.entries
        self._exact: set[tuple[str, int | None]] = set()
        self._names: set[str] = set()
        for entry in self.entries:
            if entry == "*":
                continue
            parsed = _split_host(entry)
            if parsed is None:
                raise ValueError(f"allowed_hosts entry {entry!r} is not a host or host:port")
            if parsed[1] is None:
                self._names.add(parsed[0])
            else:
                self._exact.add(parsed)

    @classmethod
    def defaults(cls, bind_host: str, port: int) -> HostAllowList:
        """The bind address (unless it is a wildcard), `localhost`, `127.0.0.1` and `[::1]`,
        each with `port`."""
        names = ["localhost", "127.0.0.1", "[::1]"]
        host = bind_host.strip().lower()
        if host not in ("", "0.0.0.0", "::", "[::]"):
            names.insert(0, f"[{host}]" if ":" in host and not host.startswith("[") else host)
        unique = dict.fromkeys(names)
        return cls(f"{name}:{port}" for name in unique)

    def allows(self, header: str, *, tls: bool = False) -> bool | None:
        """True if allowed, False if not, None when `header` is not a valid Host value."""
        parsed = _split_host(header)
        if parsed is None:
            return None
        if self.any:
            return True
        name, port = parsed
        if name in self._names:
            return True
        return (name, 443 if tls else 80 if port is None else port) in self._exact or (
            (name, port) in self._exact
        )


class HostCheck:
    """ASGI middleware: answer only requests whose `Host` is in the allow list.

    `/healthz` and `/readyz` are exempt (probes from a service manager or orchestrator use an
    address as Host; they reveal nothing but phases). The allow list is read from
    `state.allowed_hosts` at every request: the daemon fills it in once it knows its port.
    """

    def __init__(self, app: ASGIApp, state: DaemonState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = self.state.allowed_hosts
        if scope["type"] != "http" or allowed is None or scope["path"] in _HEALTH_PATHS:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host")
        verdict = None if header is None else allowed.allows(header, tls=scope["scheme"] == "https")
        if verdict:
            await self.app(scope, receive, send)
            return
        if verdict is None:
            problem = Problem(
                "bad-request",
                "the request needs a valid Host header"
                if header is None
                else f"Host {header!r} is not a valid host[:port]",
            )
        else:
            problem = Problem(
                "misdirected-request",
                f"Host {header!r} is not served here: add it to allowed_hosts if this daemon "
                "should answer it",
                host=header,
            )
        await problem_response(problem, scope["path"])(scope, receive, send)


# -- request ids -----------------------------------------------------------------------------
REQUEST_ID_SET: Final = "nucleus.request_id_set"
"""Scope key an outer layer sets once it gave the request its id (in the scope's headers and
`state`) and adds it to the response: `RequestId` then has nothing to do."""


class RequestId:
    """ASGI middleware: every response carries `X-Request-Id`: the client's when valid
    (`valid_request_id`), else a fresh one. The id is also in `scope["state"]["request_id"]`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get(REQUEST_ID_SET):  # the daemon's AccessLog did all of this already
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        request_id = given if given is not None and valid_request_id(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        raw = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", raw)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


# -- admission -------------------------------------------------------------------------------
_WRITES: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _is_stream_upload(path: str) -> bool:
    # The NDJSON stream endpoint reads its body for as long as the client writes: no total
    # deadline (each read still has `read_timeout`), no budget (it is parsed line by line).
    return path.endswith("/records/stream")


class Admission:
    """ASGI middleware deciding which requests the daemon takes on (see the module docstring).

    A request is *admitted* once the app may act on it: at once for reads, once the whole
    body has arrived for writes. Before that, the daemon may refuse it (stopping: 503; body
    too slow: 408; no budget within `read_timeout`: 503) and nothing was done; after it, the
    request runs to its answer even while the daemon stops.
    """

    def __init__(self, app: ASGIApp, state: DaemonState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        connection: Tracked | None = (scope.get("state") or {}).get(CONNECTION_KEY)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if state.stopping:
                    message = _with_close(message)
            await send(message)

        def admit() -> bool:
            return connection is None or connection.admit()

        if scope["method"] not in _WRITES:
            admit()
            await self.app(scope, receive, send_tracked)
            return
        if state.stopping:
            await _refuse(scope, receive, send, _stopping())
            return
        reader = _BodyReader(state, scope, receive, admit)
        try:
            await self.app(scope, reader.receive, send_tracked)
        finally:
            reader.release()
        if not started and reader.refusal is not None:
            await _refuse(scope, receive, send, reader.refusal)


class _BodyReader:
    """The `receive` of a write: total deadline, stop watch and byte budget on its body."""

    def __init__(
        self, state: DaemonState, scope: Scope, receive: Receive, admit: Callable[[], bool]
    ) -> None:
        self.state = state
        self.path: str = scope["path"]
        self.inner = receive
        self.admit = admit
        limits = state.limits
        self.timeout = limits.read_timeout
        self.deadline = trio.current_time() + limits.read_timeout
        self.streaming = _is_stream_upload(self.path)
        declared = Headers(scope=scope).get("content-length")
        size = int(declared) if declared is not None and declared.isdigit() else None
        # unknown length (chunked): assume the largest body allowed
        self.size = state.max_body_bytes if size is None else size
        self.held = 0
        self.budgeted = False
        self.done = False
        self.refusal: Problem | None = None

    def release(self) -> None:
        if self.held:
            self.state.budget.release(self.held)
            self.held = 0

    async def receive(self) -> Message:
        if self.done or self.refusal is not None:
            message: Message = await self.inner()
            return message
        deadline = trio.current_time() + self.timeout if self.streaming else self.deadline
        if not self.budgeted:
            self.budgeted = True
            if self.streaming and not self.admit():  # it acts on each line as it comes
                return self._refuse(_closed())
            if not self.streaming and self.size > SMALL_BODY_BYTES:
                acquired = await self._wait(self.state.budget.acquire(self.size), deadline)
                if acquired is None:
                    return self._refuse(_busy(self.state))
                self.held = acquired
        ready = self._ready()
        message = ready if ready is not None else await self._wait(self.inner(), deadline)
        if not isinstance(message, dict):
            return self._refuse(_too_slow(self.timeout))
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.done = True
            if self.streaming:
                return message
            # Admission and handing over the last chunk happen with no checkpoint between.
            if self.state.stopping:
                return self._refuse(_stopping())
            if not self.admit():
                return self._refuse(_closed())
        return message

    def _ready(self) -> Message | None:
        """The next body message if the server has it already (no deadline needed), else
        None. hypercorn's `receive` is a memory channel's; a `receive` without
        `receive_nowait` always goes through `_wait`."""
        if self.streaming or self.state.stopping:
            return None
        nowait = getattr(getattr(self.inner, "__self__", None), "receive_nowait", None)
        if nowait is None:
            return None
        try:
            message = nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return None  # `_wait` waits, or meets the same end
        return message if isinstance(message, dict) else None

    def _refuse(self, problem: Problem) -> Message:
        if self.refusal is None:  # the first reason wins (stopping, seen by the watcher)
            self.refusal = problem
        self.release()
        return {"type": "http.disconnect"}

    async def _wait(self, awaitable: Any, deadline: float) -> Any:
        """The awaitable's result, or None at the deadline or when the daemon starts stopping
        (then `refusal` says which)."""
        scopes = self.state.body_scopes
        with trio.move_on_at(deadline) as scope:
            if not self.streaming:
                if self.state.stopping:
                    scope.cancel()
                scopes.add(scope)  # `begin_stopping` cancels it
            try:
                return await awaitable
            finally:
                scopes.discard(scope)
        if self.state.stopping and not self.streaming and self.refusal is None:
            self.refusal = _stopping()
        return None


def check_batch_size(state: DaemonState, count: int) -> None:
    """Raise the 413 `batch-too-large` problem for a batch over `max_batch_records`."""
    limit = state.limits.max_batch_records
    if count > limit:
        raise Problem(
            "batch-too-large",
            f"the batch has {count} records, over max_batch_records={limit}",
            limit=limit,
        )


def checked_key(key: str) -> str:
    """An `Idempotency-Key` header value, or the 400 problem when it is not 1..255 printable
    ASCII characters (a quoted string, as the IETF draft writes it, is unquoted)."""
    if len(key) > 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not (0 < len(key) <= 255 and all(" " < c <= "~" for c in key)):
        raise Problem(
            "bad-request",
            f"Idempotency-Key must be 1..255 printable ASCII characters, got {key[:300]!r}",
        )
    return key


def _with_close(message: Message) -> Message:
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
    return {**message, "headers": [*headers, (b"connection", b"close")]}


async def _refuse(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
    problem.headers["Connection"] = "close"
    await problem_response(problem, scope["path"])(scope, receive, send)


def _stopping() -> Problem:
    return Problem("daemon-stopping", "the daemon is shutting down: retry against the next one")


def _closed() -> Problem:
    return Problem("request-timeout", "the connection was closed before the request completed")


def _too_slow(timeout: float) -> Problem:
    return Problem(
        "request-timeout", f"the request body did not arrive within read_timeout={timeout:g} s"
    )


def _busy(state: DaemonState) -> Problem:
    return Problem(
        "server-busy",
        f"too many large request bodies at once (body_budget_bytes="
        f"{state.budget.capacity}): retry shortly",
    )
