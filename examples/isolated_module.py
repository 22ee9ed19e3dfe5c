"""A module in its own process: a segfault and a blocking call are crashes of that module only.

Run: python examples/isolated_module.py

`Thumbnailer` stands for a module that calls native or blocking code. Registered with
`isolation=Isolation.PROCESS`, its callbacks run in a worker process: when it segfaults
(`ctypes.string_at(0)`) the worker dies by SIGSEGV, the supervisor restarts it, and the
delivery it died on is delivered again to the new worker; when it blocks in `time.sleep` past
its `timeout`, the worker is killed and restarted, while appends go on. The ledger and the
other modules never notice. See docs/isolation.md.

The class is defined in this script: a worker imports it by name (`isolated_module:Thumbnailer`,
this script's directory being on `sys.path`), so it must be defined at the top level.
"""

from __future__ import annotations

import ctypes
import os
import time

import trio

from nucleus_actors import (
    Hash,
    Isolation,
    LedgerConfig,
    Module,
    ModuleContext,
    ModuleHandle,
    ModuleSpec,
    ModuleState,
    Record,
    open_ledger,
)


class Thumbnailer(Module):
    """Pretends to render a thumbnail per image; some images break the renderer."""

    id = "thumbnailer"

    async def init(self, ctx: ModuleContext) -> None:
        self.incarnation = ctx.incarnation
        self.rendered: list[int] = []
        ctx.log.info("worker pid %d, incarnation %d", os.getpid(), ctx.incarnation)

    async def after_append(self, record: Record, hash: Hash) -> None:
        broken = record.payload.get("broken")
        if broken == "segfault" and self.incarnation == 1:
            ctypes.string_at(0)  # a bug in native code: SIGSEGV
        if broken == "slow" and self.incarnation == 2:
            time.sleep(5)  # noqa: ASYNC251 - a blocking library call, past the timeout
        assert record.seq is not None
        self.rendered.append(record.seq)


def rendered(module: Thumbnailer) -> list[int]:
    """Asked from the parent (an ask function must be importable: top level)."""
    return module.rendered


async def restarted(handle: ModuleHandle[Thumbnailer]) -> None:
    """Wait for the crash (RESTARTING), then for the new worker (RUNNING)."""
    with trio.fail_after(30):
        await handle.wait_state(ModuleState.RESTARTING)
        await handle.wait_state(ModuleState.RUNNING)


async def main() -> None:
    spec = ModuleSpec(Thumbnailer, isolation=Isolation.PROCESS, timeout=0.5)
    async with open_ledger(LedgerConfig(ledger_id="images"), modules=[spec]) as ledger:
        handle = ledger.modules.get(Thumbnailer)
        print(f"ledger in pid {os.getpid()}, thumbnailer in worker pid {handle.status.pid}")
        await ledger.append(Record("image.added", {"name": "cat.png"}))
        await ledger.append(Record("image.added", {"name": "bad.png", "broken": "segfault"}))
        await restarted(handle)
        print(f"after the segfault: {handle.status.last_error}")
        await ledger.append(Record("image.added", {"name": "huge.png", "broken": "slow"}))
        started = time.perf_counter()
        await ledger.append(Record("image.added", {"name": "dog.png"}))
        waited = time.perf_counter() - started
        await restarted(handle)
        print(f"after the blocking call: {handle.status.last_error}")
        print(f"appends went on meanwhile (the next one waited {waited:.1f} s, not 5 s)")
        print(f"worker pid now {handle.status.pid}, restarts {handle.status.restarts}")
        print(f"rendered by this incarnation: {await handle.ask(rendered)}")
        print(f"ledger length {ledger.state.length}, phase {ledger.state.phase.name}")


if __name__ == "__main__":
    trio.run(main)
