"""`aio.Ledger` keeps up with `LedgerEngine`, and the docs name everything it offers."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from nucleus_actors import LedgerConfig, LedgerEngine, ModuleHandle, Record, aio

from .conftest import run

DOCS = Path(__file__).resolve().parents[2] / "docs"

# Engine methods that `aio.open_ledger` runs itself (the block gets a started ledger).
RUN_BY_OPEN_LEDGER = {"register", "init_all", "start_all"}
# Trio-side plumbing (supervisor callbacks, the nursery, the storage object and its capability
# check used by storage features, the modules' view), and `phase`, which `await ledger.state()`
# carries.
ENGINE_INTERNAL = {
    "set_phase",
    "escalated",
    "nursery",
    "storage",
    "require_storage",
    "ledger_reader",
    "phase",
}


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_every_engine_operation_has_an_asyncio_counterpart() -> None:
    engine_api = _public(LedgerEngine) - RUN_BY_OPEN_LEDGER - ENGINE_INTERNAL
    explicit = _public(aio.Ledger)
    # Every engine coroutine is reachable: written out in aio.Ledger, or (one added to the
    # engine later) forwarded by `Ledger.__getattr__`.
    ledger = object.__new__(aio.Ledger)
    ledger._engine = LedgerEngine(LedgerConfig(ledger_id="api"))
    for name in engine_api:
        if inspect.iscoroutinefunction(getattr(LedgerEngine, name)):
            assert callable(getattr(ledger, name)), name
    # The engine's other public names (properties, sync snapshots, `read`) have their asyncio
    # form written out.
    assert {"state", "statistics", "modules", "read"} <= engine_api
    assert {"state", "statistics", "modules", "read", "config"} <= explicit
    handle_api = _public(ModuleHandle) - {"version"}  # in status(), per incarnation
    assert handle_api - _public(aio.ModuleHandle) == set()


def test_engine_coroutines_added_later_are_forwarded(monkeypatch: pytest.MonkeyPatch) -> None:
    async def double_length(self: LedgerEngine, factor: int, *, plus: int = 0) -> int:
        return self.state.length * factor + plus

    # As if the engine had grown a coroutine method after aio.py was written.
    monkeypatch.setattr(LedgerEngine, "double_length", double_length, raising=False)

    async def main() -> None:
        async with aio.open_ledger(LedgerConfig(ledger_id="fwd")) as ledger:
            await ledger.append(Record("a", {}))
            assert await ledger.double_length(3, plus=1) == 4
            with pytest.raises(AttributeError, match="run_in_trio"):
                ledger.no_such_thing  # noqa: B018

    run(main)


def test_asyncio_api_is_documented() -> None:
    guide = (DOCS / "asyncio.md").read_text()
    reference = (DOCS / "reference.md").read_text()
    for cls in (aio.Ledger, aio.Modules, aio.ModuleHandle):
        for name in _public(cls):
            assert f"{name}" in guide, f"docs/asyncio.md does not mention {cls.__name__}.{name}"
    for name in aio.__all__:
        value = getattr(aio, name)
        assert inspect.getdoc(value), f"aio.{name} has no docstring"
        assert f"`aio.{name}" in reference, f"docs/reference.md does not list aio.{name}"
