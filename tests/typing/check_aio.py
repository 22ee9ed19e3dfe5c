"""Static check (run by mypy in CI): the asyncio handles are typed like the trio ones."""

from __future__ import annotations

from typing import assert_type

from nucleus_actors import Module, Receipt, Record, aio


class Index(Module):
    id = "index"
    total: int = 0

    def add(self, n: int) -> int:
        return self.total + n


async def typed_aio(ledger: aio.Ledger) -> None:
    handle = await ledger.modules.get(Index)
    assert_type(handle, aio.ModuleHandle[Index])
    assert_type(await handle.ask(lambda m: m.total), int)
    assert_type(await handle.ask(Index.add, 3), int)

    async def label(m: Index) -> str:
        return m.id

    assert_type(await handle.ask(label), str)
    assert_type(await ledger.add(Index()), aio.ModuleHandle[Index])
    assert_type(await ledger.modules.get("index"), aio.ModuleHandle[Module])
    assert_type(await ledger.append(Record("k", {})), Receipt)
