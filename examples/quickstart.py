"""Quickstart: a durable ledger with two modules; append records, verify the chain, print the head.

Run it with `python examples/quickstart.py [FILE]`. The ledger lives in `./ledger.db` (or FILE):
run it again and the chain continues where the last run left it.
"""

from __future__ import annotations

import sys

import trio

from nucleus_actors import (
    Hash,
    LedgerConfig,
    Module,
    Record,
    RecordRejected,
    open_ledger,
)
from nucleus_actors.storage import SQLiteStorage


class RequireCustomer(Module):
    """Validator: every order must name a customer."""

    id = "require-customer"

    async def before_append(self, record: Record) -> Record | None:
        if record.kind.startswith("order.") and "customer" not in record.payload:
            raise RecordRejected("an order needs a 'customer'")
        return None


class KindCounter(Module):
    """Index: counts committed records per kind; ask it for the counts."""

    id = "kind-counter"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    async def after_append(self, record: Record, hash: Hash) -> None:
        self.counts[record.kind] = self.counts.get(record.kind, 0) + 1


async def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "ledger.db"
    config = LedgerConfig(ledger_id="quickstart")
    storage = SQLiteStorage(path)  # durable: every receipt below is on disk (fsynced)
    modules = [RequireCustomer(), KindCounter()]
    async with open_ledger(config, storage=storage, modules=modules) as ledger:
        found = ledger.state.length
        print(f"opened {path}: {found} entries found, head {ledger.state.head}")
        for n in range(found, found + 3):
            receipt = await ledger.append(Record("order.created", {"id": n, "customer": f"c{n}"}))
            print(f"appended seq={receipt.seq} hash={receipt.hash}")
        try:
            await ledger.append(Record("order.created", {"id": 99}))
        except RecordRejected as exc:
            print(f"rejected by {exc.module_id}: {exc.reason}")
        counts = await ledger.modules.get(KindCounter).ask(lambda m: dict(m.counts))
        print(f"counts per kind this run: {counts}")
        head = await ledger.verify()
        print(f"chain verified: {ledger.state.length} entries, head {head}")


if __name__ == "__main__":
    trio.run(main)
