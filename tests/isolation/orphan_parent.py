"""A parent for the orphan test: opens a ledger with two isolated modules, prints their
worker pids as JSON, then waits to be killed."""

from __future__ import annotations

import json
import sys

import trio

from nucleus_actors import Isolation, LedgerConfig, ModuleSpec, open_ledger

from .modules import Counter, Seen


async def main(path: str) -> None:
    modules = [
        ModuleSpec(Seen, isolation=Isolation.PROCESS, config={"path": path}),
        ModuleSpec(Counter, isolation=Isolation.PROCESS),
    ]
    async with open_ledger(LedgerConfig(ledger_id="orphans"), modules=modules) as ledger:
        pids = [status.pid for status in ledger.modules.status()]
        print(json.dumps(pids), flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
