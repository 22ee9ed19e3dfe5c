"""docs/daemon.md agrees with the code: config reference, problem types, API paths."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from nucleus_actors.daemon import (
    BackoffSettings,
    DaemonConfig,
    DaemonState,
    LedgerSettings,
    ModuleSettings,
    create_app,
    parse_config,
)
from nucleus_actors.daemon.problems import PROBLEMS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "daemon.md").read_text()

SECTIONS: dict[str, type[BaseModel]] = {
    "### Top level": DaemonConfig,
    "### `[[ledgers]]`": LedgerSettings,
    "### `[[ledgers.modules]]`": ModuleSettings,
    "### `backoff`": BackoffSettings,
}


def section(heading: str) -> str:
    start = DOC.index(f"\n{heading}\n")
    end = DOC.find("\n#", start + len(heading) + 2)
    return DOC[start : None if end < 0 else end]


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            rows.append(cells)
    return rows


def documented_default(cell: str) -> Any:
    if cell == "*required*":
        return "required"
    if cell == "*unset*":
        return None
    return tomllib.loads(f"v = {cell.strip('`')}")["v"]


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_config_reference_documents_every_field_with_its_default(heading: str) -> None:
    model = SECTIONS[heading]
    rows = {row[0].strip("`"): row for row in table_rows(section(heading))}
    assert set(rows) == set(model.model_fields), heading
    for name, field in model.model_fields.items():
        _, kind, default, meaning = rows[name]
        assert kind, name
        assert len(meaning) > 10, name
        if field.is_required():
            expected: Any = "required"
        elif field.default_factory is not None:
            expected = field.default_factory()  # type: ignore[call-arg]
        else:
            expected = field.default
        assert documented_default(default) == expected, (heading, name)


def test_every_problem_type_is_documented_with_its_status() -> None:
    rows = {row[0].strip("`"): row for row in table_rows(section("### Errors"))}
    assert set(rows) == set(PROBLEMS)
    for slug, (status, _) in PROBLEMS.items():
        assert rows[slug][1] == str(status), slug


def test_every_api_path_is_documented() -> None:
    app = create_app(DaemonState({}, token=None, max_body_bytes=1024))
    paths = set(app.openapi()["paths"]) | {"/openapi.json"}
    table = section("## HTTP API")
    for path in paths:
        assert f" {path}" in table, path


def test_the_complete_example_is_a_valid_config(tmp_path: Path) -> None:
    example = section("### A complete example")
    toml = example.split("```toml\n", 1)[1].split("```", 1)[0]
    toml = toml.replace("/var/lib/nucleus/", f"{tmp_path}/")
    config = parse_config(tomllib.loads(toml), base_dir=tmp_path)
    assert [ledger.id for ledger in config.ledgers] == ["orders", "scratch"]
