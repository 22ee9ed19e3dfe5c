"""`aio.Ledger` keeps up with `LedgerEngine`, and the docs name everything it offers."""

from __future__ import annotations

import inspect
from pathlib import Path

from nucleus_actors import LedgerEngine, ModuleHandle, aio

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
    assert engine_api - _public(aio.Ledger) == set()
    handle_api = _public(ModuleHandle) - {"version"}  # in status(), per incarnation
    assert handle_api - _public(aio.ModuleHandle) == set()


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
