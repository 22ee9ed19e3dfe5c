"""examples/test_my_module.py, the issue's "crash on the 3rd after_append" test, runs as a user
runs it: a separate pytest process in a fresh directory, with only the installed plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "test_my_module.py"


def test_the_example_passes_in_a_fresh_project(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_my_module=EXAMPLE.read_text(encoding="utf-8"))
    result = pytester.runpytest_subprocess("-v", "-W", "error")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_index_survives_a_crash PASSED*"])


def test_the_example_test_is_under_15_lines() -> None:
    tree = ast.parse(EXAMPLE.read_text(encoding="utf-8"))
    [test] = [n for n in tree.body if isinstance(n, ast.AsyncFunctionDef)]
    assert test.end_lineno is not None
    assert test.end_lineno - test.lineno + 1 < 15


def test_the_example_fails_when_the_module_loses_records(pytester: pytest.Pytester) -> None:
    """The example is not vacuous: a module that skips the redelivered record fails it."""
    broken = EXAMPLE.read_text(encoding="utf-8").replace(
        'self.ids.add(record.payload["id"])',
        'if record.seq != 2:\n            self.ids.add(record.payload["id"])',
    )
    pytester.makepyfile(test_my_module=broken)
    pytester.runpytest_subprocess().assert_outcomes(failed=1)
