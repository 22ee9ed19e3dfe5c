"""Static check (run by mypy in CI): handles and asks are typed from the module class."""

from __future__ import annotations

from typing import assert_type

from nucleus_actors import LedgerEngine, Module, ModuleHandle


class Index(Module):
    id = "index"
    total: int = 0

    def add(self, n: int) -> int:
        return self.total + n


async def typed_handles(engine: LedgerEngine) -> None:
    handle = engine.modules.get(Index)
    assert_type(handle, ModuleHandle[Index])
    assert_type(await handle.ask(lambda m: m.total), int)
    assert_type(await handle.ask(Index.add, 3), int)

    async def label(m: Index) -> str:
        return m.id

    assert_type(await handle.ask(label), str)
    assert_type(engine.register(Index()), ModuleHandle[Index])
    assert_type(engine.register(Index), ModuleHandle[Index])
    assert_type(engine.modules.get("index"), ModuleHandle[Module])
