"""The `nucleus` command line: init, verify, --help, and the core without the daemon extra."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import trio
from typer.testing import CliRunner

from nucleus_actors import LedgerConfig, Record, open_ledger
from nucleus_actors.cli import app
from nucleus_actors.daemon import Daemon, DaemonConfig, parse_config
from nucleus_actors.daemon.template import CONFIG_TEMPLATE
from nucleus_actors.storage import SQLiteStorage

from .conftest import DaemonProcess, client, nucleus, subprocess_env

runner = CliRunner()


def test_init_writes_a_config_that_run_accepts_unchanged(tmp_path: Path, start_daemon: Any) -> None:
    target = tmp_path / "fresh"
    result = runner.invoke(app, ["init", str(target)])
    assert result.exit_code == 0, result.output
    config = target / "nucleus.toml"
    assert config.read_text() == CONFIG_TEMPLATE
    assert f"nucleus run {config}" in result.stdout

    again = runner.invoke(app, ["init", str(target)])
    assert again.exit_code == 1
    assert "exists (use --force to overwrite it)" in again.stderr
    config.write_text("# edited\n")
    forced = runner.invoke(app, ["init", str(target), "--force"])
    assert forced.exit_code == 0
    assert config.read_text() == CONFIG_TEMPLATE

    # The file is served as written (only the port is overridden, to avoid clashes).
    daemon: DaemonProcess = start_daemon(config)
    with client(daemon.wait_listening()) as api:
        refused = api.post(
            "/v1/ledgers/main/records", json={"kind": "order.created", "payload": {"id": 1}}
        )
        assert refused.status_code == 409
        assert refused.json()["module"] == "require-fields"
        ok = api.post(
            "/v1/ledgers/main/records",
            json={"kind": "order.created", "payload": {"id": 1, "customer": "ada"}},
        )
        assert ok.status_code == 201
        modules = [m["id"] for m in api.get("/v1/ledgers/main/modules").json()["modules"]]
        assert modules == ["require-fields", "kind-counter"]
    assert daemon.stop(signal.SIGINT) == 0
    assert "1 records counted by kind: {'order.created': 1}" in daemon.log
    assert (target / "main.db").is_file()


def test_template_is_commented_and_names_every_top_level_key() -> None:
    data = tomllib.loads(CONFIG_TEMPLATE)
    config = parse_config(data, base_dir=Path("/tmp"))
    Daemon(config)  # every module builds
    # keys without a default value (paths) appear commented out: `# token_file = "..."`
    commented = set(re.findall(r"(?m)^# ([a-z_]+) = ", CONFIG_TEMPLATE))
    assert set(data) | commented == set(DaemonConfig.model_fields)
    comments = [line for line in CONFIG_TEMPLATE.splitlines() if line.startswith("#")]
    assert len(comments) > 20


def make_ledger(path: Path, count: int) -> None:
    async def fill() -> None:
        storage = SQLiteStorage(path)
        async with open_ledger(LedgerConfig(ledger_id="books"), storage=storage) as engine:
            await engine.append_many([Record("entry", {"n": n}) for n in range(count)])

    trio.run(fill)


def test_verify_ok_tampered_and_unusable(tmp_path: Path) -> None:
    db = tmp_path / "books.db"
    make_ledger(db, 7)
    ok = runner.invoke(app, ["verify", str(db)])
    assert ok.exit_code == 0, ok.output
    assert f"{db}: ok, 7 entries, head " in ok.stdout

    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE entries SET canonical = replace(canonical, '\"n\":4', '\"n\":5') WHERE seq = 4"
        )
    conn.close()
    bad = runner.invoke(app, ["verify", str(db)])
    assert bad.exit_code == 1, bad.output
    assert "integrity failure at seq 4" in bad.stderr

    missing = runner.invoke(app, ["verify", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2
    assert "no such file" in missing.stderr
    junk = tmp_path / "junk.db"
    junk.write_text("not a database")
    unusable = runner.invoke(app, ["verify", str(junk)])
    assert unusable.exit_code == 2
    assert "error:" in unusable.stderr
    assert "Traceback" not in unusable.output + unusable.stderr


def test_python_dash_m_and_help() -> None:
    result = nucleus("--help")
    assert result.returncode == 0
    for command in ("init", "check", "run", "verify"):
        assert command in result.stdout
    assert nucleus("--version").stdout.startswith("nucleus_actors ")
    run_help = nucleus("run", "--help").stdout
    for option in ("--host", "--port", "--log-format"):
        assert option in run_help
    assert nucleus("run").returncode == 2  # CONFIG is required


BLOCK_DAEMON_DEPS = (
    "import sys\n"
    "for name in ('fastapi', 'hypercorn', 'typer', 'rich', 'pydantic', 'starlette', 'httpx'):\n"
    "    sys.modules[name] = None\n"
)


def test_the_core_imports_without_the_daemon_extra() -> None:
    code = BLOCK_DAEMON_DEPS + (
        "import nucleus_actors, nucleus_actors.storage\n"
        "import nucleus_actors.daemon.modules\n"
        "print('core ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env()
    )
    # nucleus_actors.daemon imports lazily: its built-in modules need no server framework.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "core ok"
    core_only = code.replace("import nucleus_actors.daemon.modules\n", "")
    result = subprocess.run(
        [sys.executable, "-c", core_only], capture_output=True, text=True, env=subprocess_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "core ok"

    dash_m = (
        BLOCK_DAEMON_DEPS
        + "import runpy\nrunpy.run_module('nucleus_actors', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", dash_m], capture_output=True, text=True, env=subprocess_env()
    )
    assert result.returncode == 1
    assert "needs the daemon extra" in result.stderr
    assert "pip install 'nucleus_actors[daemon]'" in result.stderr
