"""`nucleus_actors.testing`: its public names are documented, and it uses only the public API."""

from __future__ import annotations

import ast
import inspect
import pickle
from pathlib import Path

import nucleus_actors
import nucleus_actors.testing as testing

PACKAGE = Path(testing.__file__).parent
PUBLIC_IMPORTS = {"nucleus_actors", "nucleus_actors.storage", "nucleus_actors.hashing"}


def test_every_public_name_exists_and_is_documented() -> None:
    assert len(testing.__all__) == len(set(testing.__all__))
    for name in testing.__all__:
        assert not name.startswith("_")
        value = getattr(testing, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        assert inspect.getdoc(value), f"{name} has no docstring"
        if getattr(nucleus_actors, value.__name__, None) is value:
            continue  # a core name under a testing alias: documented (and placed) in the core
        assert value.__module__ == "nucleus_actors.testing", name
        if inspect.isclass(value):
            for attr, member in vars(value).items():
                if attr.startswith("_") or not inspect.isfunction(member):
                    continue
                assert inspect.getdoc(member), f"{name}.{attr} has no docstring"


def test_the_toolkit_imports_only_the_public_api() -> None:
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.startswith("nucleus_actors"):
                    assert node.module in PUBLIC_IMPORTS, f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("nucleus_actors."), path.name


def test_call_outcome_is_the_core_callback_outcome() -> None:
    # One enum under two names: what an instrument's `CallbackResult.outcome` says is what a
    # `CallbackEvent.outcome` holds, and importing the toolkit does not relabel the core class.
    assert testing.CallOutcome is nucleus_actors.CallbackOutcome
    assert nucleus_actors.CallbackOutcome.__module__ == "nucleus_actors._instrument"
    assert pickle.loads(pickle.dumps(testing.CallOutcome.RAISED)) is testing.CallOutcome.RAISED
