"""The daemon's connection layer: hypercorn's HTTP protocol behind our own accept loop.

hypercorn parses HTTP; this module decides which connections live:

- **A cap** (`max_connections`, kept below the process's open-file limit): at the cap, a new
  connection sheds the connection that has waited longest *without an admitted request* (an
  idle keep-alive connection, a request head or body still trickling in); when every
  connection carries an admitted request, the newcomer gets 503 and is closed. Overload is
  logged once per interval, not per connection. So slow clients cannot take the daemon
  offline: a probe always finds a slot.
- **Deadlines**: an idle connection or a request head must complete within `read_timeout`
  (the body's own deadline is `guards.Admission`'s); a response must be written within it.
- **No request lost in a close**: a connection is closed by the daemon only while no request
  on it is admitted, and data read after that decision is never handed to the app. So a
  client either gets an answer or the request was never acted on.
- **Shutdown**: stop accepting, close every connection that carries no request, let admitted
  requests finish and be answered (each response says `Connection: close`), then return. It
  takes as long as the work in flight; `graceful_timeout` only bounds it.
- **Protocol errors** hypercorn answers itself (an invalid `Content-Length`, a head over
  16 KiB) are problem objects too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any, Final

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

from .guards import CONNECTION_KEY, HttpLimits, RateLimitedLog
from .problems import Problem, problem_bytes

__all__ = ["FD_RESERVE", "HttpServer", "effective_max_connections"]

log = logging.getLogger("nucleus_actors.daemon.http")

FD_RESERVE: Final = 64
"""Open files kept free for everything but connections (storage, logs, pipes, ...)."""

ACCEPT_RETRY: Final = 0.1
"""Seconds before accepting again after the process ran out of file descriptors."""

SHUTDOWN_LINGER: Final = 0.5
"""Seconds, on shutdown after every admitted request was answered, that connections still
closing (or answering a refusal) get before they are closed."""

_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def effective_max_connections(configured: int) -> int:
    """`configured`, lowered to leave `FD_RESERVE` of the open-file limit (`ulimit -n`)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


# -- protocol errors as problem objects ------------------------------------------------------
_PROTOCOL_PROBLEMS: Final = {
    431: ("header-too-large", "the request head is over the 16 KiB limit"),
}


class _H11(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, answering protocol errors with problem objects."""

    async def _send_error_response(self, status_code: int) -> None:
        slug, detail = _PROTOCOL_PROBLEMS.get(
            status_code,
            (
                "bad-request",
                "the request is not valid HTTP/1.1 (request line, a header or Content-Length)",
            ),
        )
        problem = Problem(slug, detail)
        body = problem_bytes(problem, "")
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=problem.status, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())


# -- a connection ----------------------------------------------------------------------------
class _Connection(TCPServer):
    """One client connection (hypercorn's `TCPServer` with our close rules, see the module
    docstring). Invariant: `abort()` never happens while `admitted`."""

    def __init__(
        self,
        server: HttpServer,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        state: LifespanState,
        stream: Any,
    ) -> None:
        super().__init__(app, config, context, state, stream)
        self.server = server
        self.idle = True
        """No request in progress (waiting for one, or reading its head)."""
        self.admitted = False
        """The request in progress is admitted: it must be answered."""
        self.closing = False
        """The daemon decided to close it: nothing read from now on reaches the app."""
        self.since = trio.current_time()
        """When its current request (or its idle wait) began: the oldest is shed first."""
        # The reader may wait inside hypercorn for a paused (pipelined) request that will
        # never be read once the connection closes: closing cancels it.
        self._reader = trio.CancelScope()

    # -- what the guards and the server see -------------------------------------------------
    def admit(self) -> bool:
        """Mark the request in progress admitted; False if the connection is being closed
        (then the request must not be acted on)."""
        if self.closing:
            return False
        self.admitted = True
        return True

    def describe(self) -> str:
        """One line about its state, for the log."""
        wrapper = getattr(self, "protocol", None)
        h11_connection = getattr(getattr(wrapper, "protocol", None), "connection", None)
        states = (
            f"client {getattr(h11_connection, 'their_state', '?')}, "
            f"server {getattr(h11_connection, 'our_state', '?')}"
        )
        return (
            f"idle={self.idle} admitted={self.admitted} closing={self.closing} "
            f"since={self.since:.3f} ({states})"
        )

    @property
    def busy(self) -> bool:
        """An admitted request whose answer is not yet fully written."""
        if not self.admitted or self.closing:
            return False
        h11_connection = getattr(getattr(self.protocol, "protocol", None), "connection", None)
        state = getattr(h11_connection, "our_state", None)
        return state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)

    @property
    def sheddable(self) -> bool:
        """It may be closed now: no admitted request rides on it."""
        return not self.closing and not self.admitted

    def abort(self) -> None:
        """Close the socket now (synchronously): a pending read or write ends, and data read
        after this is dropped. Only call while `sheddable` (or when giving up entirely)."""
        if self.closing:
            return
        self.closing = True
        self._reader.cancel()
        self.server.changed()
        stream = self.stream
        transport = getattr(stream, "transport_stream", stream)
        socket = getattr(transport, "socket", None)
        if socket is not None:
            socket.close()

    # -- hypercorn overrides ----------------------------------------------------------------
    async def run(self) -> None:
        # TCPServer.run, with our protocol class and the connection in the ASGI state.
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return
            alpn_protocol = self.stream.selected_alpn_protocol()
            socket = self.stream.transport_stream.socket
            ssl = True
        except AttributeError:  # not TLS
            alpn_protocol = "http/1.1"
            socket = self.stream.socket
            ssl = False
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                state = ConnectionState({**self.state, CONNECTION_KEY: self})
                args = (self.app, self.config, self.context, task_group, state, ssl, client,
                        server, self.protocol_send)  # fmt: skip
                self.protocol = ProtocolWrapper(*args, alpn_protocol)
                if alpn_protocol != "h2":
                    self.protocol.protocol = _H11(*args)
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                with self._reader:
                    await self._read_data()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            # set before any checkpoint: a close decision sees the request at once
            self.idle = event.idle
            self.admitted = False
            self.since = trio.current_time()
        if isinstance(event, RawData):
            async with self.send_lock:
                # Shielded (the app's cancellation must not cut a response in half) but
                # bounded: a client that does not read its response is dropped.
                deadline = trio.current_time() + self.server.limits.read_timeout
                with trio.CancelScope(shield=True, deadline=deadline) as scope:
                    try:
                        await self.stream.send_all(event.data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.protocol.handle(Closed())
                if scope.cancelled_caught:
                    self.abort()
                    await self.protocol.handle(Closed())
            self.server.changed()
            return
        await super().protocol_send(event)
        if isinstance(event, Closed):  # the protocol closed it (e.g. `Connection: close`)
            self.closing = True
            self._reader.cancel()
        self.server.changed()

    async def _read_data(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            if self.closing:
                break  # decided to close while this was in flight: it never reaches the app
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())

    async def _close(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await super()._close()

    async def _idle_timeout(self) -> None:
        # Idle keep-alive connections and request heads get `read_timeout` in all.
        await trio.sleep(self.server.limits.read_timeout)
        if self.idle:
            self.abort()


# -- the server ------------------------------------------------------------------------------
class HttpServer:
    """Serves an ASGI app on hypercorn's protocol with the daemon's connection rules.

    Args:
        app: the ASGI application.
        config: hypercorn's config (binds, TLS files, `graceful_timeout`, ...).
        limits: `read_timeout` and `max_connections`.
    """

    def __init__(self, app: Any, config: HypercornConfig, limits: HttpLimits) -> None:
        self.app: AppWrapper = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.config = config
        self.limits = limits
        self.max_connections = effective_max_connections(limits.max_connections)
        """The cap in force (`max_connections`, lowered to fit `ulimit -n`)."""
        self.connections: set[_Connection] = set()
        """Every connection whose task runs."""
        self.context = WorkerContext(None)
        self.overload = RateLimitedLog(log)
        self._drained = trio.Event()
        self._changed = trio.Event()  # set whenever a connection writes, closes or ends

    def changed(self) -> None:
        """A connection made progress (wakes the shutdown's wait)."""
        self._changed.set()

    def open_count(self) -> int:
        """Connections counted against the cap (those being closed are not)."""
        return sum(1 for connection in self.connections if not connection.closing)

    async def serve(
        self,
        shutdown_trigger: Callable[[], Awaitable[object]],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind, report the URLs through `task_status`, serve until `shutdown_trigger`
        returns, then shut down as the module docstring says.

        Cancellation: every connection is closed at once (requests in flight are cut).
        """
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(self.app, self.config, lifespan_state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            sockets = self.config.create_sockets()
            listeners: list[Any] = []
            urls: list[str] = []
            ssl_context = self.config.create_ssl_context()
            for sock in sockets.secure_sockets:
                sock.listen(self.config.backlog)
                listeners.append(
                    trio.SSLListener(
                        trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                        ssl_context,  # type: ignore[arg-type]
                        https_compatible=True,
                    )
                )
                urls.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
            for sock in sockets.insecure_sockets:
                sock.listen(self.config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            async with trio.open_nursery() as connections:
                try:
                    async with trio.open_nursery() as accepting:
                        for listener in listeners:
                            accepting.start_soon(
                                self._accept, listener, connections, lifespan_state
                            )
                        task_status.started(urls)
                        await shutdown_trigger()
                        accepting.cancel_scope.cancel()
                    await self._shut_down()
                finally:
                    for connection in list(self.connections):
                        connection.abort()
                    connections.cancel_scope.cancel()
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _shut_down(self) -> None:
        await self.context.terminated.set()  # no connection takes another request
        for connection in list(self.connections):
            if connection.idle and not connection.admitted:
                connection.abort()
        with trio.move_on_after(self.config.graceful_timeout) as waited:
            while any(connection.busy for connection in self.connections):
                self._changed = trio.Event()
                await self._changed.wait()
        # Everything admitted is answered; refusals (503, Connection: close) and closes in
        # progress get a moment, then whatever is left is closed.
        with trio.move_on_after(SHUTDOWN_LINGER):
            if self.connections:
                await self._drained.wait()
        if waited.cancelled_caught:
            busy = sum(1 for connection in self.connections if connection.busy)
            log.warning(
                "graceful_timeout=%gs passed with %d request(s) still running: closing them (%s)",
                self.config.graceful_timeout,
                busy,
                "; ".join(connection.describe() for connection in list(self.connections)[:5]),
            )

    async def _accept(
        self, listener: Any, nursery: trio.Nursery, lifespan_state: LifespanState
    ) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _CAPACITY_ERRNOS:
                        raise
                    self.overload.warning(
                        "cannot accept connections: %s (%d open, max_connections %d): "
                        "raise `ulimit -n` or lower max_connections",
                        exc.strerror,
                        len(self.connections),
                        self.max_connections,
                    )
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if self.open_count() >= self.max_connections and not self._shed():
                    nursery.start_soon(self._turn_away, stream)
                    continue
                connection = _Connection(
                    self, self.app, self.config, self.context, lifespan_state, stream
                )
                self.connections.add(connection)
                self._drained = trio.Event()
                nursery.start_soon(self._run, connection)

    def _shed(self) -> bool:
        """At the cap: close the connection that waited longest without an admitted request;
        False if there is none."""
        candidates = [c for c in self.connections if c.sheddable]
        if not candidates:
            self.overload.warning(
                "max_connections=%d reached and every connection has a request running: "
                "turning new connections away with 503",
                self.max_connections,
            )
            return False
        victim = min(candidates, key=lambda c: c.since)
        victim.abort()
        self.overload.warning(
            "max_connections=%d reached: closing the connections that waited longest "
            "without sending a complete request",
            self.max_connections,
        )
        return True

    async def _turn_away(self, stream: Any) -> None:
        problem = Problem("server-busy", f"max_connections={self.max_connections} reached")
        body = problem_bytes(problem, "")
        head = (
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
        )
        gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
        with trio.move_on_after(1.0), contextlib.suppress(*gone):
            await stream.send_all(head.encode() + body)
        with trio.CancelScope(shield=True), contextlib.suppress(*gone):
            await stream.aclose()

    async def _run(self, connection: _Connection) -> None:
        try:
            await connection.run()
        finally:
            self.connections.discard(connection)
            self.changed()
            if not self.connections:
                self._drained.set()
