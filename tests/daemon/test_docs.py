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
    keys = {name: field.alias or name for name, field in model.model_fields.items()}
    assert set(rows) == set(keys.values()), heading
    for name, field in model.model_fields.items():
        _, kind, default, meaning = rows[keys[name]]
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


DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_metrics_doc_lists_every_metric_with_its_type_and_labels() -> None:
    from nucleus_actors.daemon.metrics import METRICS

    text = (DOCS / "metrics.md").read_text()
    rows = {row[0].strip("`"): row for row in table_rows(text)}
    assert set(rows) == set(METRICS)
    for name, (kind, _, labels) in METRICS.items():
        assert rows[name][1] == kind, name
        assert rows[name][2] == ", ".join(f"`{label}`" for label in labels), name


def test_cli_doc_lists_every_command_and_exit_status() -> None:
    from typer.main import get_command

    from nucleus_actors.cli import app
    from nucleus_actors.daemon import client

    text = (DOCS / "cli.md").read_text()
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    documented = {
        row[0].strip("`").split()[1] for row in table_rows(text) if row[0].startswith("`nucleus")
    }
    assert documented == commands
    for command in commands - {"init", "check", "run", "verify"}:
        assert f"\n## `nucleus {command}`\n" in text, command
    statuses = {
        line.split("|")[1].strip() for line in text.splitlines() if re.match(r"\| \d+ \|", line)
    }
    codes = {client.EXIT_REFUSED, client.EXIT_BAD_INPUT, client.EXIT_UNREACHABLE}
    assert {str(code) for code in {0, *codes, client.EXIT_UNAUTHORIZED, 130}} <= statuses


def test_the_shipped_modules_example_is_a_valid_config(tmp_path: Path) -> None:
    example = section("### Modules that ship with the daemon")
    toml = example.split("```toml\n", 1)[1].split("```", 1)[0]
    toml = toml.replace("/var/lib/nucleus/", f"{tmp_path}/")
    text = f'[[ledgers]]\nid = "orders"\nstorage = ":memory:"\n{toml}'
    config = parse_config(tomllib.loads(text), base_dir=tmp_path)
    uses = [module.use for module in config.ledgers[0].modules]
    assert uses == ["json-schema", "kind-counter", "jsonl-mirror"]
