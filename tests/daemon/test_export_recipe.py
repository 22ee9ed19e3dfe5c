"""docs/hashing.md is enough for a third party: its recipe (blake3 + json + base64 only)
verifies real exports, slices and the mirror file, and refuses a tampered one."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from nucleus_actors.cli import app

from .conftest import REPO, DaemonProcess, toml_str

runner = CliRunner()
DOC = (REPO / "docs" / "hashing.md").read_text(encoding="utf-8")


def _recipe() -> dict[str, Any]:
    block = re.search(r"<!-- recipe:begin -->\n```python\n(.*?)```", DOC, re.S)
    assert block is not None, "docs/hashing.md lost its recipe block"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), "docs/hashing.md recipe", "exec"), namespace)
    return namespace


RECIPE = _recipe()
verify_export = RECIPE["verify_export"]
check_canonical = RECIPE["check_canonical"]

RECORDS: list[dict[str, Any]] = [
    {"kind": "order.created", "payload": {"id": 7, "items": ["apple", "pear"]}},
    {"kind": "order.paid", "payload": {"amount": 56.0, "fee": 0.5}, "meta": {"trace": "a1"}},
    {"kind": "order.note", "payload": {"text": "café ☃ 😀", "z": None, "é": True}},
    {"kind": "numbers", "payload": [1e21, 1e-7, -0.0, 5e-324, 9007199254740991, 1.5e300]},
    {"kind": "meta", "payload": None, "meta": {"é": "x", "b": "y", "\U0001f600": "z"}},
    {"kind": "commande.créée", "payload": {"\u20ac": [{"a": [[]]}]}},
    {"kind": "n", "payload": 3},
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    directory = tmp_path_factory.mktemp("recipe")
    mirror = directory / "mirror.jsonl"
    config = directory / "nucleus.toml"
    config.write_text(
        f'[[ledgers]]\nid = "orders"\nstorage = {toml_str(directory / "orders.db")}\n'
        f'[[ledgers.modules]]\nuse = "jsonl-mirror"\nconfig = {{ path = {toml_str(mirror)} }}\n'
    )
    process = DaemonProcess(config)
    try:
        url = process.wait_listening()
        with httpx.Client(base_url=url, timeout=20) as api:
            for record in RECORDS:
                response = api.post("/v1/ledgers/orders/records", json=record)
                assert response.status_code == 201, response.text
        yield url, mirror
    finally:
        process.close()


def _head(url: str) -> dict[str, Any]:
    head: dict[str, Any] = httpx.get(f"{url}/v1/ledgers/orders/head").json()
    return head


def test_the_recipe_verifies_a_real_export(daemon: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = daemon
    target = tmp_path / "orders.jsonl"
    result = runner.invoke(app, ["export", "--url", url, "-o", str(target), "--no-progress"])
    assert result.exit_code == 0, result.output
    head = _head(url)
    assert verify_export(target.read_bytes().splitlines()) == (
        "orders",
        head["length"],
        head["head"],
    )
    for line in target.read_bytes().splitlines()[1:]:
        check_canonical(base64.b64decode(json.loads(line)["canonical"]))
    # 56.0 was submitted; the export writes the canonical 56 (as the hashed bytes do).
    assert b'"payload":{"amount":56,"fee":0.5}' in target.read_bytes()


def test_the_recipe_verifies_a_slice_from_its_header_alone(
    daemon: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = daemon
    result = runner.invoke(app, ["export", "--url", url, "--from", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    header = json.loads(result.stdout.splitlines()[0])
    entry_2 = httpx.get(f"{url}/v1/ledgers/orders/records/2").json()
    assert header["from"] == 3
    assert header["prev"] == entry_2["hash"]
    head = _head(url)
    assert verify_export(result.stdout.splitlines()) == ("orders", head["length"], head["head"])


def test_the_mirror_file_is_the_export_and_verifies(daemon: tuple[str, Path]) -> None:
    url, mirror = daemon
    result = runner.invoke(app, ["export", "--url", url, "--no-progress"])
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 30
    while mirror.read_bytes().count(b"\n") < len(RECORDS) + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mirror.read_bytes() == result.stdout.encode()
    head = _head(url)
    assert verify_export(mirror.read_bytes().splitlines()) == (
        "orders",
        head["length"],
        head["head"],
    )


def test_the_recipe_refuses_tampered_exports(daemon: tuple[str, Path]) -> None:
    url, _ = daemon
    lines = runner.invoke(app, ["export", "--url", url, "--no-progress"]).stdout.splitlines()
    changed_field = [*lines[:3], lines[3].replace('"z":null', '"z":false'), *lines[4:]]
    with pytest.raises(SystemExit, match="entry 2: the decoded fields do not match"):
        verify_export(changed_field)
    entry = json.loads(lines[2])
    entry["hash"] = "00" * 32
    with pytest.raises(SystemExit, match="chain breaks at seq 1"):
        verify_export([lines[0], lines[1], json.dumps(entry), *lines[3:]])
    header = json.loads(lines[0])
    header["ledger_id"] = "other"
    with pytest.raises(SystemExit, match="genesis"):
        verify_export([json.dumps(header), *lines[1:]])


def test_the_docs_example_lines_verify() -> None:
    blocks = re.findall(r"```json\n(\{\"nucleus_export\".*?)```", DOC, re.S)
    assert blocks, "docs/hashing.md lost its export header example"
    entries = re.search(r"```json\n(\{\"seq\":0.*?)```", DOC, re.S)
    assert entries is not None
    lines = [blocks[0].strip(), *entries.group(1).strip().splitlines()]
    ledger, length, _ = verify_export(lines)
    assert (ledger, length) == ("orders", 2)


def test_nucleus_status_shows_the_ledger_id(daemon: tuple[str, Path]) -> None:
    url, _ = daemon
    result = runner.invoke(app, ["status", "--url", url])
    assert "ledger orders:" in result.stdout
    as_json = runner.invoke(app, ["status", "--url", url, "--json"])
    assert json.loads(as_json.stdout)["ledgers"][0]["ledger"] == "orders"
