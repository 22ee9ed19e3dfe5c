"""Append to a SQLite ledger forever, printing each receipt; the crash test SIGKILLs it.

Usage: python sqlite_crash_writer.py LEDGER_FILE

Eight tasks append concurrently (single records and small `append_many` batches, so the
engine's group commit puts several callers in one transaction). Each receipt is printed as
`<seq> <hash hex>` and flushed only after `append` returned, i.e. after its transaction was
durable: every line the parent reads names an entry that must survive the kill.
"""

from __future__ import annotations

import sys

import trio

from nucleus_actors import LedgerConfig, Record, open_ledger
from nucleus_actors.storage import SQLiteStorage


async def main(path: str) -> None:
    storage = SQLiteStorage(path)
    async with open_ledger(LedgerConfig(ledger_id="crash"), storage=storage) as ledger:
        print(f"open {ledger.state.length}", flush=True)

        async def writer(n: int) -> None:
            i = 0
            while True:
                i += 1
                if i % 5 == 0:
                    receipts = await ledger.append_many(
                        [Record("crash.batch", {"w": n, "i": i, "j": j}) for j in range(3)]
                    )
                else:
                    receipts = [await ledger.append(Record("crash.one", {"w": n, "i": i}))]
                sys.stdout.write("".join(f"{r.seq} {r.hash.hex()}\n" for r in receipts))
                sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(writer, n)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
