"""Client commands start fast: they import no server framework, trio or pydantic."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nucleus_actors import cli
from nucleus_actors.daemon import client, problems, server

from .conftest import DaemonProcess, running_daemon, subprocess_env

SERVER_SIDE = ("trio", "fastapi", "hypercorn", "starlette", "uvicorn", "pydantic")
# pydantic is in the list although typer (0.2x) coerces command-line values through pydantic
# TypeAdapters: nucleus_actors._typer_lite coerces the client commands' simple options
# without it.

# Runs a CLI command in a fresh interpreter, then prints which heavy modules it imported.
PROBE = """
import json, sys
from nucleus_actors.cli import app
try:
    app(sys.argv[1:], standalone_mode=True)
except SystemExit:
    pass
loaded = sorted({name.split(".")[0] for name in sys.modules})
print("\\n@@" + json.dumps(loaded))
"""


def loaded_by(*args: str, stdin: str = "") -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=subprocess_env(NUCLEUS_TOKEN=""),
        timeout=60,
        check=False,
    )
    marker = out.stdout.rindex("\n@@")
    modules: list[str] = json.loads(out.stdout[marker + 3 :])
    return modules


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    config = '[[ledgers]]\nid = "main"\nstorage = ":memory:"\n'
    with running_daemon(tmp_path_factory.mktemp("startup"), config) as proc:
        yield proc


def test_version_imports_neither_the_server_nor_httpx_nor_rich() -> None:
    modules = loaded_by("--version")
    assert not set(modules) & {*SERVER_SIDE, "pydantic", "httpx", "rich"}, modules


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["append", "-k", "note", "--json", "1"],
        ["append", "-k", "note"],
        ["tail", "-n", "5"],
        ["export", "--no-progress", "-o", "{tmp}/out.jsonl"],
        ["export", "--no-progress", "--from", "1", "--to", "2", "-o", "{tmp}/part.jsonl"],
        ["tail", "-n", "2", "--format", "text"],
    ],
)
def test_client_commands_import_no_server_framework(
    daemon: DaemonProcess, command: list[str], tmp_path: Path
) -> None:
    url = daemon.wait_listening()
    args = [part.replace("{tmp}", str(tmp_path)) for part in command]
    modules = loaded_by(*args, "--url", url, stdin="1\n2\n")
    assert "httpx" in modules or "append" in command  # it did talk to the daemon
    assert not set(modules) & set(SERVER_SIDE), modules


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tail", "-n", "abc"], "Input should be a valid integer"),
        (["tail", "-n", "-5"], "Input should be greater than or equal to 0"),
        (["export", "--format", "nope", "-o", "x"], "'nope' is not one of 'jsonl'"),
        (["status", "--json", "--url", ""], None),
    ],
)
def test_option_errors_without_pydantic(args: list[str], message: str | None) -> None:
    """Bad option values are refused as typer's pydantic adapters refuse them (usage error,
    exit 2, the same messages), and pydantic is still not imported."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(NUCLEUS_TOKEN="", NUCLEUS_URL="http://127.0.0.1:1", COLUMNS="200"),
        timeout=60,
        check=False,
    )
    if message is not None:
        assert message in out.stderr, out.stderr
    marker = out.stdout.rindex("\n@@")
    assert "pydantic" not in json.loads(out.stdout[marker + 3 :])


def test_light_constants_agree_with_their_server_side_twins() -> None:
    assert (cli.EXIT_FAILURE, cli.EXIT_CONFIG) == (server.EXIT_FAILURE, server.EXIT_CONFIG)
    assert client.PROBLEM_TYPE_PREFIX == problems.PROBLEM_TYPE_PREFIX


def test_shell_completion_script_and_completions() -> None:
    script = subprocess.run(
        [sys.executable, "-c", "from nucleus_actors.cli import main; main()",
         "--show-completion", "bash"],
        capture_output=True, text=True, env=subprocess_env(), timeout=60, check=False,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    assert "complete_bash" in script.stdout
    env = subprocess_env(_NUCLEUS_COMPLETE="complete_bash", COMP_WORDS="nucleus run --log",
                         COMP_CWORD="2")  # fmt: skip
    words = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.argv[0] = 'nucleus'; from nucleus_actors.cli import main; main()"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    ).stdout.split()  # fmt: skip
    assert words == ["--log-format", "--log-level"]
