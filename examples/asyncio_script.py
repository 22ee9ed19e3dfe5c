"""A plain `asyncio.run` script with a ledger: producers, a reader, and a module asked for totals.

The ledger runs on its own trio thread (`nucleus_actors.aio.open_ledger`); the script is
ordinary asyncio code. Three producer tasks append payments concurrently; a `Totals` module
(trio code) refuses non-positive amounts and keeps a total per account from `after_append`;
the script asks it for the totals, reads the entries back and verifies the chain.

Run it with `python examples/asyncio_script.py`.
"""

from __future__ import annotations

import asyncio

from nucleus_actors import Hash, LedgerConfig, Module, ModuleContext, Record, RecordRejected, aio

PAYMENTS = {
    "alice": [500, 250, 125],
    "bob": [1000, -5, 300],
    "carol": [42],
}


class Totals(Module):
    """Refuses non-positive amounts; keeps a total per account; answers `ask`."""

    id = "totals"

    async def init(self, ctx: ModuleContext) -> None:
        self.totals: dict[str, int] = {}
        async for entry in ctx.ledger.read(0):  # rebuild from what is stored
            self._apply(entry.record)

    async def before_append(self, record: Record) -> Record | None:
        if record.payload["amount"] <= 0:
            raise RecordRejected(f"amount must be positive, got {record.payload['amount']}")
        return None

    async def after_append(self, record: Record, hash: Hash) -> None:
        self._apply(record)

    def _apply(self, record: Record) -> None:
        account = record.payload["account"]
        self.totals[account] = self.totals.get(account, 0) + record.payload["amount"]


async def producer(ledger: aio.Ledger, account: str, amounts: list[int]) -> int:
    committed = 0
    for amount in amounts:
        try:
            await ledger.append(Record("payment", {"account": account, "amount": amount}))
            committed += 1
        except RecordRejected as exc:
            print(f"{account}: payment of {amount} refused: {exc}")
    return committed


async def main() -> None:
    config = LedgerConfig(ledger_id="payments")
    async with aio.open_ledger(config, modules=[Totals()]) as ledger:
        counts = await asyncio.gather(
            *(producer(ledger, account, amounts) for account, amounts in PAYMENTS.items())
        )
        totals = await ledger.modules.get(Totals)
        print(f"committed {sum(counts)} payments")
        print(f"totals: {await totals.ask(lambda module: dict(sorted(module.totals.items())))}")
        print(f"entries read back: {len([entry async for entry in ledger.read()])}")
        print(f"chain verified, head {await ledger.verify()}")
    print("ledger stopped")


if __name__ == "__main__":
    asyncio.run(main())
