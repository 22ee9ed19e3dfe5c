"""Modules that daemon tests name in their configs (`use = "tests.daemon.testmods:..."`)."""

from __future__ import annotations

import trio

from nucleus_actors import Hash, Module, ModuleContext, Record


class StopMarker(Module):
    """Writes `<config.dir>/<ledger>.<id>.stopped` (holding the ledger length) when stop runs."""

    id = "marker"

    async def stop(self, ctx: ModuleContext) -> None:
        path = trio.Path(ctx.config["dir"]) / f"{ctx.ledger_id}.{ctx.module_id}.stopped"
        await path.write_text(str(ctx.ledger.state.length))


class Explode(Module):
    """Crashes in before_append on records of kind "explode" (the append fails: 503)."""

    id = "explode"

    async def before_append(self, record: Record) -> Record | None:
        if record.kind == "explode":
            raise RuntimeError("explode on cue")
        return None


class Boom(Module):
    """Crashes in after_append on records of kind "boom" (the ledger escalates when
    max_restarts = 0)."""

    id = "boom"

    async def after_append(self, record: Record, hash: Hash) -> None:
        if record.kind == "boom":
            raise RuntimeError("boom on cue")


class Gate(Module):
    """Holds records of kind "slow" in before_append until `<config.dir>/release` exists;
    writes `<config.dir>/entered` first (so a test knows the request is in flight)."""

    id = "gate"

    def __init__(self) -> None:
        self.dir = trio.Path(".")

    async def init(self, ctx: ModuleContext) -> None:
        self.dir = trio.Path(ctx.config["dir"])

    async def before_append(self, record: Record) -> Record | None:
        if record.kind == "slow":
            await (self.dir / "entered").write_text("1")
            while not await (self.dir / "release").exists():
                await trio.sleep(0.01)
        return None


class HangOnStop(Module):
    """Its stop never returns (configure `shutdown = inf`)."""

    id = "hang"

    async def stop(self, ctx: ModuleContext) -> None:
        await trio.sleep_forever()


class NeedsArgs(Module):
    """Cannot be built without arguments (a config naming it is an error)."""

    id = "needs-args"

    def __init__(self, size: int) -> None:
        self.size = size


NOT_A_CLASS = 42


class FailsInit(Module):
    """Its init fails at run time (not a configuration problem: `nucleus check` accepts it)."""

    id = "fails-init"

    async def init(self, ctx: ModuleContext) -> None:
        raise OSError("the device this module needs is gone")
