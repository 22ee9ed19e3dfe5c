"""Every example with a `main` runs as a script, in a fresh directory, and prints what it says.

Examples are run as users run them (`python examples/<name>.py`, a subprocess) with an empty
temporary directory as the working directory, so files they create (`ledger.db`) land there.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _has_main(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "main"
        for node in tree.body
    )


RUNNABLE = sorted(path for path in EXAMPLES.glob("*.py") if _has_main(path))

# Lines (regular expressions, in order) an example must print; examples not listed here are
# only required to exit with status 0.
EXPECTED: dict[str, list[str]] = {
    "quickstart.py": [
        r"opened ledger\.db: 0 entries found, head [0-9a-f]{64}",
        r"appended seq=0 hash=[0-9a-f]{64}",
        r"appended seq=1 hash=[0-9a-f]{64}",
        r"appended seq=2 hash=[0-9a-f]{64}",
        r"rejected by require-customer: an order needs a 'customer'",
        r"counts per kind this run: \{'order\.created': 3\}",
        r"chain verified: 3 entries, head [0-9a-f]{64}",
    ],
    "isolated_module.py": [
        r"ledger in pid \d+, thumbnailer in worker pid \d+",
        r"after the segfault: .*worker exited by signal 11 \(SIGSEGV\)\"\)",
        r"after the blocking call: TimeoutError\(\"after_append exceeded the module's timeout .*",
        r"appends went on meanwhile .*",
        r"worker pid now \d+, restarts 2",
        r"rendered by this incarnation: \[2, 3\]",
        r"ledger length 4, phase RUNNING",
    ],
}


def _run(example: Path, cwd: Path) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(example)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{example.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout.splitlines()


def test_the_quickstart_is_found() -> None:
    assert EXAMPLES / "quickstart.py" in RUNNABLE


@pytest.mark.parametrize("example", RUNNABLE, ids=lambda path: path.name)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    lines = _run(example, tmp_path)
    expected = EXPECTED.get(example.name, [])
    assert len(lines) >= len(expected)
    for pattern, line in zip(expected, lines, strict=False):
        assert re.fullmatch(pattern, line), f"{example.name}: {line!r} !~ {pattern!r}"


def test_quickstart_continues_its_chain_when_run_again(tmp_path: Path) -> None:
    first = _run(EXAMPLES / "quickstart.py", tmp_path)
    assert (tmp_path / "ledger.db").is_file()
    second = _run(EXAMPLES / "quickstart.py", tmp_path)
    head_after_first = first[-1].rsplit(" ", 1)[1]
    assert second[0] == f"opened ledger.db: 3 entries found, head {head_after_first}"
    assert second[1].startswith("appended seq=3 ")
    assert second[-1].startswith("chain verified: 6 entries, head ")


def test_embed_in_app_totals_and_rejections(tmp_path: Path) -> None:
    lines = _run(EXAMPLES / "embed_in_app.py", tmp_path)
    refused = "bob: payment of -5 refused by amount-validator: amount must be a positive integer"
    assert f"{refused} of cents, got -5" in lines
    assert "final totals: {'alice': 875, 'bob': 1300, 'carol': 42}" in lines
    assert "committed 6 payments, rejected 2" in lines
    assert re.fullmatch(r"chain verified, head [0-9a-f]{64}", lines[-1])
