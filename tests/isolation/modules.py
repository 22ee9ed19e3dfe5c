"""Modules the isolation tests run in worker processes (importable by qualified name)."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

from nucleus_actors import Hash, Module, ModuleContext, Record, RecordRejected


class Seen(Module):
    """Appends every seq it processes to the file `config["path"]` (one line each), so that
    the test sees every incarnation's deliveries; a record's kind triggers a fault."""

    id = "seen"

    async def init(self, ctx: ModuleContext) -> None:
        self.path = ctx.config["path"]
        self.incarnation = ctx.incarnation
        self.pid = os.getpid()
        ctx.log.info("seen: init incarnation %d in pid %d", ctx.incarnation, os.getpid())
        if ctx.config.get("fail_init_after") and ctx.incarnation > ctx.config["fail_init_after"]:
            raise RuntimeError(f"init refuses incarnation {ctx.incarnation}")

    async def after_append(self, record: Record, hash: Hash) -> None:
        kind = record.kind
        if kind == "segv" and self.incarnation == 1:
            ctypes.string_at(0)
        elif kind == "exit3" and self.incarnation == 1:
            os._exit(3)
        elif kind == "hog" and self.incarnation == 1:
            hog = bytearray(1 << 31)  # 2 GiB, past any memory_limit of the tests
            hog[0] = 1
        elif kind == "block" and self.incarnation == 1:
            time.sleep(3)  # noqa: ASYNC251 - the fault under test: it blocks the worker
        elif kind == "raise" and self.incarnation == 1:
            raise ValueError(f"refusing seq {record.seq}")
        with open(self.path, "a") as file:  # noqa: ASYNC230 - tiny, and it is the point
            file.write(f"{record.seq}\n")

    def seqs(self) -> list[int]:
        with open(self.path) as file:
            return [int(line) for line in file]

    def where(self) -> tuple[int, int]:
        return self.pid, self.incarnation


def read_seen(path: Any) -> list[int]:
    try:
        with open(path) as file:
            return [int(line) for line in file]
    except FileNotFoundError:
        return []


class Gate(Module):
    """before_append: rejects kind "bad", tags others, crashes on kind "boom"."""

    id = "gate"

    async def before_append(self, record: Record) -> Record | None:
        if record.kind == "bad":
            raise RecordRejected(f"kind bad refused by pid {os.getpid()}")
        if record.kind == "boom":
            raise KeyError("boom")
        return record.with_meta(checked_by=str(os.getpid()))


class Counter(Module):
    """Counts deliveries; asks answer from its own process."""

    id = "counter"

    def __init__(self) -> None:
        self.count = 0

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.count += 1

    def total(self) -> int:
        return self.count

    def pid(self) -> int:
        return os.getpid()

    def unpicklable(self) -> Any:
        return lambda: None

    async def ask_other(self, ctx_module: str) -> Any:
        return None


def total(module: Counter) -> int:
    return module.count


def add(module: Counter, n: int) -> int:
    return module.count + n


def fail(module: Counter) -> None:
    raise LookupError("no such thing")


class Reader(Module):
    """Reads the ledger through `ctx.ledger` in init; asks another module from a hook."""

    id = "reader"

    async def init(self, ctx: ModuleContext) -> None:
        self.ctx = ctx
        self.length_at_init = ctx.ledger.state.length
        self.read_at_init = [entry.seq async for entry in ctx.ledger.read()]
        self.first = None if not self.read_at_init else (await ctx.ledger.get(0)).record.kind
        self.root = (await ctx.ledger.root()).hex() if self.length_at_init else None
        self.asked: list[int] = []

    async def after_append(self, record: Record, hash: Hash) -> None:
        if record.kind == "ask":
            self.asked.append(await self.ctx.modules.get("counter").ask(total))

    def report(self) -> dict[str, Any]:
        return {
            "length_at_init": self.length_at_init,
            "read_at_init": self.read_at_init,
            "first": self.first,
            "root": self.root,
            "asked": self.asked,
            "config": dict(self.ctx.config),
        }


class Spawner(Module):
    """Background work from `ctx.spawn`: config "background" is "crash" or "exit"."""

    id = "spawner"

    async def start(self, ctx: ModuleContext) -> None:
        self.ctx = ctx

    async def after_append(self, record: Record, hash: Hash) -> None:
        if record.kind == "spawn-crash" and self.ctx.incarnation == 1:
            self.ctx.spawn(_crash_soon)
        elif record.kind == "exit" and self.ctx.incarnation == 1:
            self.ctx.exit()


async def _crash_soon() -> None:
    raise OSError("background work failed")


class BrokenInWorker(Module):
    """Builds in the parent (register learns its id) but not in a worker."""

    id = "broken"

    def __init__(self) -> None:
        main = sys.modules["__main__"]
        if getattr(getattr(main, "__spec__", None), "name", "") == "nucleus_actors.module._worker":
            raise RuntimeError("cannot be built in a worker")


class Slow(Module):
    """Takes `config["seconds"]` (blocking) per delivery."""

    id = "slow"

    async def init(self, ctx: ModuleContext) -> None:
        self.seconds = float(ctx.config["seconds"])

    async def after_append(self, record: Record, hash: Hash) -> None:
        time.sleep(self.seconds)  # noqa: ASYNC251 - a slow module
