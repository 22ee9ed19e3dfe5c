"""The public API: every name in `__all__` exists, is documented, and nothing private leaks."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import nucleus_actors

CONTRACT = {
    "LedgerEngine", "LedgerConfig", "LedgerState", "Phase", "open_ledger",
    "Module", "ModuleContext", "ModuleHandle", "ModuleSpec", "ModuleStatus", "ModuleState",
    "Restart", "Strategy", "Overflow", "Record", "Entry", "Hash", "Receipt",
    "NucleusError", "ModuleError", "RecordRejected", "LifecycleError", "RegistryError",
    "StorageError", "IntegrityError", "LedgerFailed", "InvalidRecord",
    "CommitUnknown", "Fenced", "ProofError", "EventLoopError",
}  # fmt: skip

PUBLIC_MODULES = [
    "nucleus_actors",
    "nucleus_actors.errors",
    "nucleus_actors.hashing",
    "nucleus_actors.proofs",
    "nucleus_actors.checkpoint",
    "nucleus_actors.storage",
]


def test_contract_names_are_exported() -> None:
    assert set(nucleus_actors.__all__) >= CONTRACT


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_names_exist_are_public_and_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = module.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    for name in names:
        assert not name.startswith("_"), f"{module_name}.{name} is private"
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_storage_contract_names(tmp_path: Path) -> None:
    from nucleus_actors.storage import MemoryStorage, SQLiteStorage, StorageBackend

    assert isinstance(MemoryStorage(), StorageBackend)
    assert isinstance(SQLiteStorage(tmp_path / "ledger.db"), StorageBackend)
    assert not isinstance(object(), StorageBackend)


def test_error_hierarchy_matches_the_contract() -> None:
    from nucleus_actors import errors as e

    tree = {
        e.InvalidRecord: (e.NucleusError, ValueError),
        e.LifecycleError: (e.NucleusError,),
        e.LedgerFailed: (e.LifecycleError,),
        e.RegistryError: (e.NucleusError,),
        e.ModuleError: (e.NucleusError,),
        e.RecordRejected: (e.ModuleError,),
        e.StorageError: (e.NucleusError,),
        e.IntegrityError: (e.StorageError,),
        e.CommitUnknown: (e.StorageError,),
        e.Fenced: (e.StorageError,),
        e.ProofError: (e.NucleusError, ValueError),
        e.EventLoopError: (e.NucleusError, RuntimeError),
    }
    for cls, bases in tree.items():
        assert cls.__bases__ == bases, cls
    assert e.NucleusError.__bases__ == (Exception,)


def test_package_import_is_lazy() -> None:
    """`import nucleus_actors` alone imports neither trio nor any server framework (PEP 562)."""
    import subprocess
    import sys

    code = (
        "import sys, nucleus_actors; heavy = {'trio', 'fastapi', 'hypercorn', 'pydantic'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # and every public name still resolves on first use, from its defining module
    for name in nucleus_actors.__all__:
        assert getattr(nucleus_actors, name) is not None


def test_no_private_module_leaks_through_the_package() -> None:
    for name in nucleus_actors.__all__:
        getattr(nucleus_actors, name)  # resolve the lazy names first
    public = set(nucleus_actors.__all__)
    leaked = {
        name
        for name, value in vars(nucleus_actors).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name not in public
    }
    assert leaked == set()


def test_every_public_name_is_in_the_reference() -> None:
    from pathlib import Path

    import nucleus_actors.storage

    reference = (Path(__file__).parents[1] / "docs" / "reference.md").read_text()
    names = [*nucleus_actors.__all__, *nucleus_actors.storage.__all__]
    missing = [name for name in names if f"`{name}" not in reference]
    assert missing == [], f"docs/reference.md does not document {missing}"


def test_docs_links_resolve() -> None:
    import re
    from pathlib import Path

    docs = Path(__file__).parents[1] / "docs"
    broken = []
    for page in docs.glob("*.md"):
        for target in re.findall(r"\]\(([a-z0-9_-]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if not (docs / target).is_file():
                broken.append(f"{page.name} -> {target}")
    assert broken == []


def test_runtime_objects_have_no_public_constructor_and_the_view_no_mutators() -> None:
    """`ModuleHandle` and `ModuleRegistry` are made by the engine only; `engine.modules` (and
    `ctx.modules`, the same view) has no method that changes anything."""
    from nucleus_actors import LedgerConfig, LedgerEngine, ModuleHandle, ModuleRegistry

    for cls in (ModuleHandle, ModuleRegistry):
        with pytest.raises(TypeError, match="has no public constructor"):
            cls(None)  # type: ignore[call-arg]
    view = LedgerEngine(LedgerConfig(ledger_id="x")).modules
    public = {name for name in dir(view) if not name.startswith("_")}
    assert public == {"get", "status", "counts"}


# Public methods of the public classes: each is documented (a docstring) and listed in
# docs/reference.md or the page the reference links for it; internal ones carry a `_` name.
DOCUMENTED_METHODS = {
    "LedgerEngine": {
        "add", "add_instrument", "append", "append_each", "append_each_keyed", "append_keyed",
        "append_many",
        "append_stalled_for", "config", "fence", "get", "init_all", "refresh",
        "modules", "phase", "read", "register", "remove", "remove_instrument", "require_storage",
        "restart", "root", "inclusion_proof", "consistency_proof",
        "start_all", "state", "statistics", "stop_all", "storage", "terminate", "verify",
        "wait_length", "wait_phase",
    },
    "ModuleHandle": {"ask", "id", "state", "status", "version", "wait_state"},
    "ModuleRegistry": {"counts", "get", "status"},
    "ModuleContext": {
        "config", "exit", "incarnation", "ledger", "ledger_id", "log", "module_id",
        "modules", "spawn",
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(DOCUMENTED_METHODS))
def test_nothing_undocumented_is_public(name: str) -> None:
    cls = getattr(nucleus_actors, name)
    public = {n for n in dir(cls) if not n.startswith("_")}
    public |= {n for n in getattr(cls, "__slots__", ()) if not n.startswith("_")}
    if name == "LedgerEngine":
        public |= {"config", "storage"}  # instance attributes
    assert public == DOCUMENTED_METHODS[name]
    for attr in public:
        value = getattr(cls, attr, None)
        if callable(value) and not isinstance(value, type):
            assert inspect.getdoc(value), f"{name}.{attr} has no docstring"
