"""Quickstart: open a ledger with two modules, append records, verify the chain, print the head.

Run it with `python examples/quickstart.py`.
"""

from __future__ import annotations

import trio

from nucleus_actors import (
    Hash,
    LedgerConfig,
    Module,
    Record,
    RecordRejected,
    open_ledger,
)


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
    config = LedgerConfig(ledger_id="quickstart")
    async with open_ledger(config, modules=[RequireCustomer(), KindCounter()]) as ledger:
        for n in range(3):
            receipt = await ledger.append(
                Record("order.created", {"id": n, "customer": f"c{n}"})
            )
            print(f"appended seq={receipt.seq} hash={receipt.hash}")
        try:
            await ledger.append(Record("order.created", {"id": 99}))
        except RecordRejected as exc:
            print(f"rejected by {exc.module_id}: {exc.reason}")
        counts = await ledger.modules.get(KindCounter).ask(lambda m: dict(m.counts))
        print(f"counts per kind: {counts}")
        head = await ledger.verify()
        print(f"chain verified: {ledger.state.length} entries, head {head}")


if __name__ == "__main__":
    trio.run(main)
