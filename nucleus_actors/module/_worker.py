"""The worker process of an isolated module: `python -m nucleus_actors.module._worker`.

One worker runs one incarnation of one module. Its parent (the module's actor, through
`_proxy.WorkerProxy`) talks to it over its stdin/stdout pipes in length-prefixed pickle
frames; the worker's own stdin and stdout are pointed elsewhere first, so that a module that
prints cannot corrupt the channel.

* A **thread** waits (with `poll`, reading nothing) for the parent's end of the control pipe
  to close, and then ends the process at once (`os._exit`): it sees it even while the module
  blocks the trio loop (in C, in `time.sleep`), so a worker never outlives its parent, however
  the parent died. The frames themselves are read by a trio task.
* Calls (`init`, `start`, `stop`, `resume_after`, a batch of `after_append` or
  `before_append`, `ask`) run one at a time, in order, each in a cancel scope that a `cancel`
  frame cancels. Hook batches report progress (`tick`) so that the parent can enforce the
  module's timeout per record.
* `ctx.ledger`, `ctx.modules.get(id).ask(...)`, `ctx.exit()` and `ctx.log` are requests to the
  parent; `ctx.spawn` runs the work here (an error in it is reported as a crash).
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import select
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from types import MappingProxyType
from typing import Any

from ._isolation import decode_error, encode_error, frame, read_frame

READ_CHUNK = 256
"""Entries fetched from the parent per request while `ctx.ledger.read` iterates."""


class _Channel:
    """The worker's end of the control pipe (writes are blocking and whole frames)."""

    def __init__(self, out_fd: int) -> None:
        self._out = out_fd
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = memoryview(frame(message))
        with self._lock:
            while data:
                written = os.write(self._out, data)
                data = data[written:]


class _ForwardLogs(logging.Handler):
    """Sends every log record to the parent, which re-emits it under the same logger name."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = None
            if record.exc_info:
                exc_text = logging.Formatter().formatException(record.exc_info)
            self._channel.send(
                (
                    "log",
                    {
                        "name": record.name,
                        "levelno": record.levelno,
                        "levelname": record.levelname,
                        "msg": record.getMessage(),
                        "exc_text": exc_text or record.exc_text,
                        "created": record.created,
                        "msecs": record.msecs,
                        "pathname": record.pathname,
                        "filename": record.filename,
                        "module": record.module,
                        "lineno": record.lineno,
                        "funcName": record.funcName,
                        "process": record.process,
                        "processName": record.processName,
                        "threadName": record.threadName,
                    },
                )
            )
        except Exception:  # pragma: no cover - logging must never crash the module
            self.handleError(record)


def _exit_on_hangup(fd: int) -> None:
    """Wait (without reading) until the parent's end of the control pipe is closed; exit."""
    poller = select.poll()
    poller.register(fd, 0)  # no events asked: poll() returns on hang-up or error only
    while True:
        for _, events in poller.poll():
            if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


def _block(*_: object) -> None:
    """SIGUSR1: block the worker's main thread for good (the fault toolkit's `hang`)."""
    while True:
        time.sleep(3600)


def main() -> None:
    # The control channel gets its own descriptors; fd 0 reads nothing and fd 1 goes to
    # stderr, so a module that reads stdin or prints cannot touch the channel.
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    channel = _Channel(out_fd)
    signal.signal(signal.SIGUSR1, _block)
    # The parent decides when a worker ends (EOF on the pipe, or SIGKILL): a Ctrl-C or a
    # SIGTERM sent to the whole process group must not end it behind its parent's back.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def read(size: int) -> bytes:
        return os.read(in_fd, size)

    hello = read_frame(read)
    if hello is None:
        os._exit(0)
    _, settings = hello
    level = settings["log_level"]
    root = logging.getLogger()
    root.handlers[:] = [_ForwardLogs(channel)]
    root.setLevel(level)

    import trio  # after the hello: a parent that died at once costs no trio import

    from ._isolation import import_target

    try:
        factory = import_target(settings["target"])
    except BaseException as exc:
        channel.send(("fatal", encode_error(exc)))
        os._exit(1)
    _Worker(channel, settings, factory).run(in_fd, trio)


class _RemoteLedger:
    """`ctx.ledger` in a worker: `state` as of the current call; reads are parent requests."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    @property
    def state(self) -> Any:
        return self._worker.state

    async def get(self, seq: int) -> Any:
        return await self._worker.request("ledger", "get", (seq,))

    async def read(self, start: int = 0, stop: int | None = None) -> AsyncIterator[Any]:
        if stop is None:  # the head when the read starts, as for a task module
            stop = await self._worker.request("ledger", "length", ())
        while start < stop:
            chunk = await self._worker.request(
                "ledger", "read", (start, min(stop, start + READ_CHUNK))
            )
            if not chunk:
                return
            for entry in chunk:
                yield entry
            start += len(chunk)

    async def verify(self) -> Any:
        return await self._worker.request("ledger", "verify", ())

    async def root(self, size: int | None = None) -> Any:
        return await self._worker.request("ledger", "root", (size,))

    async def inclusion_proof(self, seq: int, size: int | None = None) -> Any:
        return await self._worker.request("ledger", "inclusion_proof", (seq, size))

    async def consistency_proof(self, old_size: int, new_size: int | None = None) -> Any:
        return await self._worker.request("ledger", "consistency_proof", (old_size, new_size))


class _RemoteHandle:
    """A handle on another module, seen from a worker: `ask` only."""

    def __init__(self, worker: _Worker, module_id: str) -> None:
        self._worker = worker
        self.id = module_id

    def __repr__(self) -> str:
        return f"<remote ModuleHandle {self.id!r}>"

    async def ask(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`ModuleHandle.ask` through the parent; `fn`, `args` and the result must pickle."""
        try:
            blob = pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise TypeError(
                f"ask from an isolated module needs a picklable function and arguments (a "
                f"top-level function or a method looked up by name): {exc}"
            ) from exc
        return await self._worker.request("ask", self.id, (blob,))


class _RemoteRegistry:
    """`ctx.modules` in a worker: `get(id)` gives a handle whose `ask` goes through the parent."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    def get(self, key: str) -> _RemoteHandle:
        if not isinstance(key, str):
            raise TypeError(f"ctx.modules.get in an isolated module takes a module id, got {key!r}")
        return _RemoteHandle(self._worker, key)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"ctx.modules.{name} is not available in an isolated module (only get(id).ask)"
        )


class _Worker:
    def __init__(
        self, channel: _Channel, settings: Mapping[str, Any], factory: Callable[[], Any]
    ) -> None:
        self.channel = channel
        self.settings = settings
        self.factory = factory
        self.state: Any = None
        self._pending: dict[int, Any] = {}  # request id -> trio.Event-like slot
        self._next_request = 0
        self._scopes: dict[int, Any] = {}  # call id -> its cancel scope
        self.module: Any = None
        self.ctx: Any = None

    # -- plumbing --------------------------------------------------------------------------
    def run(self, in_fd: int, trio: Any) -> None:
        self.trio = trio
        trio.run(self._main, in_fd)

    async def _main(self, in_fd: int) -> None:
        trio = self.trio
        send, self._inbox = trio.open_memory_channel(float("inf"))

        # The parent's end of the pipe closing (its exit, even by SIGKILL) ends this process
        # at once: a thread waits for the hang-up with poll() (it reads nothing), so it sees
        # it even while the module blocks the trio loop (in C, in time.sleep).
        threading.Thread(
            target=_exit_on_hangup, args=(in_fd,), name="nucleus-worker-eof", daemon=True
        ).start()

        async def reader() -> None:
            stream = trio.lowlevel.FdStream(in_fd)
            buffer = bytearray()
            while True:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    os._exit(0)  # the parent closed the pipe: never outlive it
                buffer += chunk
                while len(buffer) >= 4:
                    size = int.from_bytes(buffer[:4], "big")
                    if len(buffer) < 4 + size:
                        break
                    message = pickle.loads(bytes(buffer[4 : 4 + size]))
                    del buffer[: 4 + size]
                    send.send_nowait(message)

        from ._context import ModuleContext

        try:
            limit = self.settings["memory_limit"]
            if limit is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            module = self.factory()
            module.id = self.settings["module_id"]
        except BaseException as exc:
            self.channel.send(("fatal", encode_error(exc)))
            os._exit(1)
        self.module = module
        calls_send, calls_receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            self.ctx = ctx = ModuleContext(
                ledger_id=self.settings["ledger_id"],
                module_id=self.settings["module_id"],
                config=MappingProxyType(self.settings["config"]),
                ledger=_RemoteLedger(self),
                modules=_RemoteRegistry(self),  # type: ignore[arg-type]
                incarnation=self.settings["incarnation"],
                exit=self._exit,
            )
            self._background = nursery
            ctx._nursery = nursery
            ctx._observe = self._observe
            nursery.start_soon(reader)
            nursery.start_soon(self._serve, calls_receive)
            self.channel.send(("ready", os.getpid()))
            async for message in self._inbox:
                kind = message[0]
                if kind == "call":
                    calls_send.send_nowait(message)
                elif kind == "reply":
                    _, rid, ok, value = message
                    slot = self._pending.pop(rid, None)
                    if slot is not None:
                        slot.append((ok, value))
                        slot[0].set()
                elif kind == "cancel":
                    scope = self._scopes.get(message[1])
                    if scope is not None:
                        scope.cancel()

    def _exit(self) -> None:
        self.channel.send(("exit",))
        for scope in list(self._scopes.values()):
            scope.cancel()

    def _observe(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Background work: an exception in it is reported to the parent as a crash."""
        trio = self.trio

        async def work(*args: Any) -> Any:
            try:
                return await fn(*args)
            except Exception as exc:
                self.channel.send(("crash", encode_error(exc)))
                await trio.sleep_forever()

        work.__qualname__ = getattr(fn, "__qualname__", "work")
        return work

    async def request(self, target: str, method: str, args: tuple[Any, ...]) -> Any:
        """Ask the parent (ledger reads, asks to other modules) and wait for its reply."""
        trio = self.trio
        rid = self._next_request = self._next_request + 1
        slot: list[Any] = [trio.Event()]
        self._pending[rid] = slot
        self.channel.send(("rpc", rid, target, method, args))
        try:
            await slot[0].wait()
        finally:
            self._pending.pop(rid, None)
        ok, value = slot[1]
        if not ok:
            raise decode_error(value)
        return value

    # -- calls -----------------------------------------------------------------------------
    async def _serve(self, calls: Any) -> None:
        trio = self.trio
        async for _, cid, op, args, state, tick in calls:
            self.state = state
            with trio.CancelScope() as scope:
                self._scopes[cid] = scope
                try:
                    ok, value = await self._call(cid, op, args, tick)
                except Exception as exc:  # pragma: no cover - _call catches module errors
                    ok, value = False, (None, encode_error(exc))
            self._scopes.pop(cid, None)
            if scope.cancelled_caught:
                ok, value = False, (None, ("Cancelled", "trio", (), "Cancelled()"))
            try:
                self.channel.send(("done", cid, ok, value))
            except Exception as exc:  # the result does not pickle
                error = TypeError(
                    f"the result of {op} cannot be pickled (it crosses a process boundary: "
                    f"the module is isolated): {exc!r}"
                )
                self.channel.send(("done", cid, False, (None, encode_error(error))))

    async def _call(self, cid: int, op: str, args: Any, tick: float | None) -> tuple[bool, Any]:
        module, ctx = self.module, self.ctx
        if op in ("init", "start", "stop", "resume_after"):
            try:
                value = await getattr(module, op)(ctx)
            except Exception as exc:
                return False, (None, encode_error(exc))
            return True, value
        if op == "ask":
            try:
                fn, fn_args = pickle.loads(args)
                value = fn(module, *fn_args)
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:
                return False, (None, encode_error(exc))
            return True, value
        if op == "after":
            return await self._after(cid, args, tick)
        assert op == "before", op
        return await self._before(cid, args, tick)

    async def _after(self, cid: int, items: list[Any], tick: float | None) -> tuple[bool, Any]:
        hook = self.module.after_append
        clock = time.monotonic
        durations: list[float] = []
        last = clock()
        for index, (record, digest) in enumerate(items):
            started = clock()
            try:
                await hook(record, digest)
            except Exception as exc:
                durations.append(clock() - started)
                return False, (index, encode_error(exc), durations)
            now = clock()
            durations.append(now - started)
            if tick is not None and now - last >= tick:
                last = now
                self.channel.send(("tick", cid, index + 1, None))
        return True, durations

    async def _before(self, cid: int, records: list[Any], tick: float | None) -> tuple[bool, Any]:
        from ..errors import RecordRejected

        hook = self.module.before_append
        clock = time.monotonic
        results: list[Any] = []
        durations: list[float] = []
        sent = 0
        last = clock()
        for index, record in enumerate(records):
            started = clock()
            try:
                out = await hook(record)
            except RecordRejected as rejected:
                out = ("rejected", encode_error(rejected))
            except Exception as exc:
                durations.append(clock() - started)
                return False, (index, encode_error(exc), (results, durations))
            else:
                out = ("record", out) if out is not None and out is not record else None
            now = clock()
            durations.append(now - started)
            results.append(out)
            if tick is not None and now - last >= tick:
                last = now
                self.channel.send(("tick", cid, index + 1, results[sent:]))
                sent = len(results)
        return True, (results, durations)


if __name__ == "__main__":
    main()
