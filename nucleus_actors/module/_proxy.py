"""The parent's side of an isolated module's worker process (see `_worker.py`).

A `WorkerProxy` belongs to one incarnation of one module: the actor (`_actor.Child`) starts
it before `init`, sends it every callback as a `call` frame and awaits the `done` frame, and
closes it (SIGKILL, then reaps it) when the incarnation ends. Its reader task serves what the
worker asks for (ledger reads, asks to other modules), re-emits the worker's log records, and
turns the worker's end into a crash of the incarnation, unless the parent ended it on purpose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ModuleError
from ._isolation import decode_error, encode_error, frame
from ._mailbox import Reply

if TYPE_CHECKING:
    from ._actor import Child

__all__ = ["WorkerProxy", "describe_exit"]

_HEADER = struct.Struct(">I")
_READ_LIMIT = 256  # entries per ledger read request (the worker asks chunk by chunk)


def describe_exit(returncode: int) -> str:
    """`"signal 11 (SIGSEGV)"` or `"code 3"`: how a worker process ended."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"signal {-returncode} ({name})"
    return f"code {returncode}"


def _python_path() -> str:
    entries = [os.path.abspath(p or os.getcwd()) for p in sys.path if isinstance(p, str)]
    return os.pathsep.join(dict.fromkeys(entries))


class WorkerProxy:
    """One worker process: start it, call it, serve its requests, end it."""

    def __init__(self, child: Child, incarnation: int, nursery: trio.Nursery) -> None:
        self._child = child
        self._incarnation = incarnation
        self._nursery = nursery
        self._process: trio.Process | None = None
        self._send_lock = trio.Lock()
        self._calls: dict[int, tuple[Reply, Callable[[int, Any], None] | None]] = {}
        self._next_call = 0
        self._ready = trio.Event()
        self._ended = trio.Event()
        self._failure: BaseException | None = None  # why it ended (or failed to start)
        self._killed: str | None = None  # the parent ended it on purpose: why
        self.pid: int | None = None
        self._log = logging.getLogger(f"nucleus_actors.module.{child.id}")

    @property
    def usable(self) -> bool:
        """Started and still running (calls can be sent)."""
        return self.pid is not None and not self._ended.is_set() and self._killed is None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn the worker and wait until it imported and built the module.

        Cancellation: the worker is killed (its incarnation ends anyway).

        Raises:
            ModuleError: the worker could not be started, or ended before it was ready (the
                cause says why: the module's import error, the exit code or signal).
        """
        child = self._child
        spec = child.spec
        module_logger = logging.getLogger(f"nucleus_actors.module.{child.id}")
        level = min(module_logger.getEffectiveLevel(), logging.getLogger().getEffectiveLevel())
        settings = {
            "target": child.target,
            "module_id": child.id,
            "ledger_id": child.host.ledger_id,
            "incarnation": self._incarnation,
            "config": json.loads(child.config_json),
            "memory_limit": spec.memory_limit,
            "log_level": level,
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = _python_path()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "nucleus_actors.module._worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                cwd=os.getcwd(),
            )
        except OSError as exc:
            raise child.module_error("could not start its worker process", exc) from exc
        self._process = process
        self._nursery.start_soon(self._read, name=f"module {child.id} worker reader")
        await self._send(frame(("hello", settings)))
        await self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def kill(self, reason: str) -> None:
        """End the worker now (SIGKILL) on purpose: its end is then not reported as a crash."""
        if self._killed is None:
            self._killed = reason
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # already reaped
                process.kill()

    def interrupt(self) -> None:
        """SIGUSR1: the worker blocks its main thread for good (the fault toolkit's `hang`)."""
        if self.pid is not None and not self._ended.is_set():
            os.kill(self.pid, signal.SIGUSR1)

    async def close(self) -> None:
        """Kill the worker and reap it (the incarnation is over). Call it shielded."""
        self.kill("its incarnation ended")
        process = self._process
        if process is not None:
            await process.wait()
            await self._ended.wait()
            if process.stdin is not None:
                await process.stdin.aclose()
            if process.stdout is not None:
                await process.stdout.aclose()
        self._fail_calls(self._failure or self._gone())

    # -- calls -------------------------------------------------------------------------------
    async def call(
        self,
        op: str,
        args: Any,
        *,
        tick: float | None = None,
        on_tick: Callable[[int, Any], None] | None = None,
    ) -> tuple[bool, Any]:
        """Run callback `op` in the worker; returns `(ok, value)` as the worker sent it.

        Cancellation: the worker is told to cancel the call (the caller kills it if it must
        not go on, e.g. after a timeout); its late answer is discarded.

        Raises:
            ModuleError: the worker has ended (the cause names how), before or during the call.
            TypeError: `args` cannot be pickled.
        """
        if not self.usable:
            raise self._failure or self._gone()
        self._next_call += 1
        cid = self._next_call
        state = self._child.host.ledger_reader.state
        data = frame(("call", cid, op, args, state, tick))
        reply = Reply()
        self._calls[cid] = (reply, on_tick)
        try:
            await self._send(data)
            result: tuple[bool, Any] = await reply.wait()
            return result
        except trio.Cancelled:
            if self.usable:
                self._nursery.start_soon(self._send_quietly, frame(("cancel", cid)))
            raise
        finally:
            self._calls.pop(cid, None)

    def _gone(self) -> ModuleError:
        why = self._killed or "it ended"
        return self._child.module_error(f"has no worker process ({why})", None)

    def _fail_calls(self, error: BaseException) -> None:
        calls, self._calls = self._calls, {}
        for reply, _ in calls.values():
            reply.fail(error)

    async def _send(self, data: bytes) -> None:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        async with self._send_lock:
            try:
                await process.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self._ended.wait()  # the reader reports how it ended
                raise self._failure or self._gone() from None

    async def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(Exception):  # it ended: nothing left to tell it
            await self._send(data)

    # -- the reader ---------------------------------------------------------------------------
    async def _read(self) -> None:
        process = self._process
        assert process is not None
        assert process.stdout is not None
        stream = process.stdout
        buffer = bytearray()
        protocol_error: BaseException | None = None
        try:
            while protocol_error is None:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 4:
                    (size,) = _HEADER.unpack_from(buffer)
                    if len(buffer) < 4 + size:
                        break
                    body = bytes(buffer[4 : 4 + size])
                    del buffer[: 4 + size]
                    try:
                        message = pickle.loads(body)
                    except Exception as exc:
                        protocol_error = exc
                        break
                    self._dispatch(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if protocol_error is not None:
            process.kill()
        returncode = await process.wait()
        self._ended_with(returncode, protocol_error)

    def _ended_with(self, returncode: int, protocol_error: BaseException | None) -> None:
        child = self._child
        if self._failure is None:
            if self._killed is not None:
                self._failure = child.module_error(
                    f"worker process was killed by the runtime ({self._killed})", None
                )
            elif protocol_error is not None:
                self._failure = child.module_error(
                    "worker sent a message the parent cannot read", protocol_error
                )
            else:
                self._failure = ModuleError(
                    f"module {child.id!r} worker exited by {describe_exit(returncode)}"
                    + ("" if self.pid is not None else " before it was ready"),
                    module_id=child.id,
                )
        self._ended.set()
        self._ready.set()
        self._fail_calls(self._failure)
        # A worker that never became ready failed `start()`, which reports it as init's error.
        if self._killed is None and self.pid is not None and child.incarnation == self._incarnation:
            child.crash_now(self._failure)

    def _dispatch(self, message: Any) -> None:
        kind = message[0]
        if kind == "done":
            entry = self._calls.get(message[1])
            if entry is not None:
                entry[0].set((message[2], message[3]))
        elif kind == "tick":
            entry = self._calls.get(message[1])
            if entry is not None and entry[1] is not None:
                entry[1](message[2], message[3])
        elif kind == "rpc":
            self._nursery.start_soon(self._serve_request, *message[1:])
        elif kind == "log":
            self._relog(message[1])
        elif kind == "exit":
            self._child._request_exit(self._incarnation)
        elif kind == "crash":
            error = decode_error(message[1])
            if self._child.incarnation == self._incarnation:
                self._child.crash_now(error)
        elif kind == "ready":
            self.pid = message[1]
            self._ready.set()
        elif kind == "fatal":
            error = decode_error(message[1])
            self._failure = self._child.module_error("worker could not build the module", error)
            self._ready.set()

    def _relog(self, fields: dict[str, Any]) -> None:
        logger = logging.getLogger(fields["name"])
        if not logger.isEnabledFor(fields["levelno"]):
            return
        record = logging.makeLogRecord(fields)
        logger.handle(record)

    async def _serve_request(self, rid: int, target: str, method: str, args: Any) -> None:
        child = self._child
        try:
            if target == "ledger":
                value = await self._ledger_request(method, args)
            else:
                assert target == "ask", target
                fn, fn_args = pickle.loads(args[0])
                handle = child.host.registry_view.get(method)
                value = await handle.ask(fn, *fn_args)
            data = frame(("reply", rid, True, value))
        except Exception as exc:
            data = frame(("reply", rid, False, encode_error(exc)))
        await self._send_quietly(data)

    async def _ledger_request(self, method: str, args: tuple[Any, ...]) -> Any:
        reader = self._child.host.ledger_reader
        if method == "length":
            return reader.state.length
        if method == "read":
            start, stop = args
            stop = min(stop, start + _READ_LIMIT)
            return [entry async for entry in reader.read(start, stop)]
        if method not in ("get", "verify", "root", "inclusion_proof", "consistency_proof"):
            raise AttributeError(f"ctx.ledger has no method {method!r}")
        return await getattr(reader, method)(*args)
