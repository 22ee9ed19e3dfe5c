"""A FastAPI service (asyncio, on uvicorn) that keeps its orders in a nucleus_actors ledger.

The ledger is opened in the app's lifespan with `nucleus_actors.aio.open_ledger`: it runs on
its own trio thread, and every route simply awaits it. Its one module, `OrderValidator`, is
ordinary trio code; it refuses orders without a customer or with a non-positive amount, and
the route turns that `RecordRejected` into a 422. Shutting the server down leaves the
lifespan, which stops the module and closes the SQLite file.

Run it:

    ORDERS_DB=orders.db uvicorn fastapi_app:app --app-dir examples --port 8000
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"customer": "c-17", "amount": 1250}'
    curl localhost:8000/orders

or `python examples/fastapi_app.py --port 8000` (the same, started from Python).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from nucleus_actors import LedgerConfig, Module, Record, RecordRejected, aio
from nucleus_actors.storage import SQLiteStorage


class OrderValidator(Module):
    """Refuses orders without a customer or with an amount that is not a positive integer.

    Like every module it is trio code, run by the ledger's trio loop (never call asyncio
    APIs here; `aio.run_in_host` hands work to the app's loop if a module ever needs to).
    """

    id = "order-validator"
    version = "1.0.0"

    async def before_append(self, record: Record) -> Record | None:
        if record.kind != "order.created":
            return None
        customer = record.payload.get("customer")
        amount = record.payload.get("amount")
        if not isinstance(customer, str) or not customer:
            raise RecordRejected("an order needs a 'customer'")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise RecordRejected(f"amount must be a positive integer of cents, got {amount!r}")
        return None


class Order(BaseModel):
    customer: str
    amount: int


def create_app(db_path: str) -> FastAPI:
    """The app, with its ledger stored in the SQLite file `db_path`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = LedgerConfig(ledger_id="orders")
        async with aio.open_ledger(
            config, storage=SQLiteStorage(db_path), modules=[OrderValidator()]
        ) as ledger:
            app.state.ledger = ledger
            yield

    app = FastAPI(title="orders", lifespan=lifespan)

    def ledger_of(app: FastAPI) -> aio.Ledger:
        ledger: aio.Ledger = app.state.ledger
        return ledger

    @app.post("/orders", status_code=201)
    async def create_order(order: Order) -> dict[str, Any]:
        record = Record("order.created", order.model_dump())
        try:
            receipt = await ledger_of(app).append(record)
        except RecordRejected as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        return {"seq": receipt.seq, "hash": str(receipt.hash)}

    @app.get("/orders")
    async def list_orders(start: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        ledger = ledger_of(app)
        length = (await ledger.state()).length
        stop = min(length, start + max(0, limit))
        return [
            {"seq": entry.seq, "hash": str(entry.hash), **entry.record.payload}
            async for entry in ledger.read(min(start, stop), stop)
        ]

    @app.get("/orders/{seq}")
    async def get_order(seq: int) -> dict[str, Any]:
        try:
            entry = await ledger_of(app).get(seq)
        except IndexError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return {"seq": entry.seq, "hash": str(entry.hash), **entry.record.payload}

    @app.get("/ledger")
    async def ledger_head() -> dict[str, Any]:
        ledger = ledger_of(app)
        state = await ledger.state()
        verified = await ledger.verify()
        return {"phase": state.phase.value, "length": state.length, "head": str(verified)}

    return app


app = create_app(os.environ.get("ORDERS_DB", "orders.db"))

if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser(description="orders service on a nucleus_actors ledger")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)
