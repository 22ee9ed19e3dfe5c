"""The API app in process (httpx's ASGI transport over a live engine): paging details."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from nucleus_actors import LedgerConfig, Record, open_ledger
from nucleus_actors.daemon import DaemonState, LedgerHost, create_app, parse_config
from nucleus_actors.daemon import app as app_module


async def test_range_reads_stop_at_the_page_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "MAX_PAGE_BYTES", 300)
    settings = parse_config(
        {"ledgers": [{"id": "main", "storage": ":memory:"}]}, base_dir=Path(".")
    ).ledgers[0]
    async with open_ledger(LedgerConfig(ledger_id="main")) as engine:
        await engine.append_many([Record("k", {"text": "x" * 100, "n": n}) for n in range(7)])
        host = LedgerHost(settings, engine, None)
        host.serving = True
        app = create_app(DaemonState({"main": host}, token=None, max_body_bytes=1 << 20))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            pages = []
            start: int | None = 0
            while start is not None:
                response = await api.get("/v1/ledgers/main/records", params={"start": start})
                page = response.json()
                pages.append([entry["seq"] for entry in page["entries"]])
                start = page["next"]
    # Each entry is ~150 canonical bytes: a page stops once it reaches 300.
    assert pages == [[0, 1], [2, 3], [4, 5], [6]]
