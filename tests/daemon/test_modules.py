"""The modules shipped with the daemon: RequireFields and KindCounter (in process)."""

from __future__ import annotations

import pytest

from nucleus_actors import (
    Hash,
    LedgerConfig,
    LedgerEngine,
    ModuleError,
    ModuleSpec,
    Record,
    RecordRejected,
    open_ledger,
)
from nucleus_actors.daemon.modules import KindCounter, RequireFields
from nucleus_actors.storage import MemoryStorage


def require(**config: object) -> ModuleSpec[RequireFields]:
    return ModuleSpec(RequireFields, config=config)


async def test_require_fields_rejects_missing_fields_of_checked_kinds() -> None:
    spec = require(fields=["customer", "total"], kinds=["order."])
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[spec]) as engine:
        await engine.append(Record("order.created", {"customer": "ada", "total": 3}))
        await engine.append(Record("note", "not an order: not checked"))
        with pytest.raises(RecordRejected, match=r"is missing 'total' in its payload") as info:
            await engine.append(Record("order.created", {"customer": "ada"}))
        assert info.value.module_id == "require-fields"
        with pytest.raises(RecordRejected, match=r"needs an object payload with 'customer'"):
            await engine.append(Record("order.paid", [1, 2]))
        assert engine.state.length == 2


async def test_require_fields_without_kinds_checks_everything() -> None:
    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[require(fields=["id"])]) as e:
        with pytest.raises(RecordRejected, match=r"record of kind 'note' is missing 'id'"):
            await e.append(Record("note", {}))


@pytest.mark.parametrize(
    "config",
    [{}, {"fields": "customer"}, {"fields": []}, {"fields": [1]}, {"fields": ["a"], "kinds": [""]}],
)
async def test_require_fields_bad_config_fails_startup(config: dict[str, object]) -> None:
    with pytest.raises(ModuleError, match=r"require-fields") as info:
        async with open_ledger(LedgerConfig(ledger_id="t"), modules=[require(**config)]):
            pass
    assert "must be a non-empty list of non-empty strings" in str(info.value.__cause__)


async def test_kind_counter_counts_exactly_once_across_restarts_and_reopens() -> None:
    storage = MemoryStorage()
    config = LedgerConfig(ledger_id="t")
    async with open_ledger(config, storage=storage, modules=[KindCounter]) as engine:
        await engine.append_many([Record("a", 1), Record("b", 2), Record("a", 3)])
        handle = engine.modules.get(KindCounter)
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 2, "b": 1}
        # A restart rebuilds from the ledger and does not double count.
        await engine.terminate("kind-counter")
        await engine.append(Record("b", 4))
        await engine.restart("kind-counter")
        await engine.append(Record("c", 5))
        assert await handle.ask(lambda m: dict(m.counts)) == {"a": 2, "b": 2, "c": 1}

    # Reopening the same storage: counts are rebuilt.
    engine = LedgerEngine(config, storage)
    engine.register(KindCounter)
    async with engine:
        await engine.init_all()
        await engine.start_all()
        counts = await engine.modules.get(KindCounter).ask(lambda m: dict(m.counts))
        assert counts == {"a": 2, "b": 2, "c": 1}


async def test_kind_counter_ignores_a_redelivery_after_its_own_crash() -> None:
    class Fragile(KindCounter):
        calls = 0

        async def after_append(self, record: Record, hash: Hash) -> None:
            await super().after_append(record, hash)
            Fragile.calls += 1
            if Fragile.calls == 1:
                raise RuntimeError("crash after counting")  # redelivered to the new incarnation

    async with open_ledger(LedgerConfig(ledger_id="t"), modules=[Fragile]) as engine:
        await engine.append(Record("x", 1))
        await engine.append(Record("x", 2))
        handle = engine.modules.get(Fragile)
        assert await handle.ask(lambda m: dict(m.counts)) == {"x": 2}
        assert handle.status.restarts == 1
