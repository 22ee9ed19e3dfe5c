"""Embedding a ledger in a trio application that has its own tasks.

The application runs three producers that append payment events concurrently, while a
reporter task asks the index module for running totals. The ledger has two modules:

* `AmountValidator` rejects payments without a positive integer amount (a veto, not a crash);
* `TotalsIndex` keeps totals per account from `after_append`, and answers `ask` queries.

The ledger lives inside the application's own nursery: when the application finishes (or is
interrupted with Ctrl+C), leaving `open_ledger` stops both modules in reverse order.

Run it with `python examples/embed_in_app.py`.
"""

from __future__ import annotations

import trio

from nucleus_actors import (
    Hash,
    LedgerConfig,
    LedgerEngine,
    Module,
    ModuleContext,
    Record,
    RecordRejected,
    open_ledger,
)

ACCOUNTS = ("alice", "bob", "carol")


class AmountValidator(Module):
    """Rejects payments whose amount is not a positive integer (in cents)."""

    id = "amount-validator"
    version = "1.0.0"

    async def before_append(self, record: Record) -> Record | None:
        if record.kind != "payment":
            return None
        amount = record.payload.get("amount")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise RecordRejected(f"amount must be a positive integer of cents, got {amount!r}")
        return record.with_meta(validated_by=self.id)


class TotalsIndex(Module):
    """Totals per account, built from committed records; query it with `ask`."""

    id = "totals"
    version = "1.0.0"

    async def init(self, ctx: ModuleContext) -> None:
        # Rebuild from what the ledger already holds (a restart, or a reopened file).
        self.totals: dict[str, int] = {}
        self.last_seq = -1
        async for entry in ctx.ledger.read(0):
            self._apply(entry.record)

    def _apply(self, record: Record) -> None:
        assert record.seq is not None
        if record.seq <= self.last_seq:
            return  # at-least-once delivery across restarts: ignore what we already counted
        self.last_seq = record.seq
        if record.kind == "payment":
            account = record.payload["account"]
            self.totals[account] = self.totals.get(account, 0) + record.payload["amount"]

    async def after_append(self, record: Record, hash: Hash) -> None:
        self._apply(record)

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.totals.items()))


async def producer(ledger: LedgerEngine, account: str, amounts: list[int]) -> None:
    for amount in amounts:
        try:
            await ledger.append(Record("payment", {"account": account, "amount": amount}))
        except RecordRejected as exc:
            print(f"{account}: payment of {amount} refused by {exc.module_id}: {exc.reason}")
        await trio.sleep(0.001)


async def reporter(ledger: LedgerEngine, done: trio.Event) -> None:
    totals = ledger.modules.get(TotalsIndex)
    while not done.is_set():
        with trio.move_on_after(0.01):
            await done.wait()
        print(f"running totals: {await totals.ask(TotalsIndex.snapshot)}")


async def main() -> None:
    config = LedgerConfig(ledger_id="payments")
    async with open_ledger(config, modules=[AmountValidator(), TotalsIndex()]) as ledger:
        done = trio.Event()
        async with trio.open_nursery() as app:
            app.start_soon(reporter, ledger, done)
            async with trio.open_nursery() as producers:
                producers.start_soon(producer, ledger, "alice", [500, 250, 125])
                producers.start_soon(producer, ledger, "bob", [1000, -5, 300])
                producers.start_soon(producer, ledger, "carol", [42, 0])
            done.set()
        final = await ledger.modules.get(TotalsIndex).ask(TotalsIndex.snapshot)
        print(f"final totals: {final}")
        stats = ledger.statistics()
        print(f"committed {stats.appends} payments, rejected {stats.rejects}")
        print(f"chain verified, head {await ledger.verify()}")


if __name__ == "__main__":
    trio.run(main)
