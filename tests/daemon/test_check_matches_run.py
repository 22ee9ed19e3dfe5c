"""`nucleus check` validates everything `nucleus run` validates before serving, and those
problems make `run` exit 2 (a configuration error, not 1: systemd's RestartPreventExitStatus=2
must stop a restart loop). Also: `use = "mymods:Class"` from the working directory with the
`nucleus` console script, and wrong hook signatures refused at `register`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nucleus_actors import Hash, LedgerConfig, LedgerEngine, Module, Record, RegistryError
from nucleus_actors.cli import app

from .conftest import nucleus, subprocess_env, toml_str

runner = CliRunner()

MODULES = """
from nucleus_actors import Module


class Picky(Module):
    id = "picky"

    @staticmethod
    def check_config(config):
        if config.get("level") not in (1, 2, 3):
            raise ValueError(f"config 'level' must be 1, 2 or 3, got {config.get('level')!r}")

    async def init(self, ctx):
        self.check_config(ctx.config)
"""


def _config(tmp_path: Path, ledger: str, modules: str = "") -> Path:
    path = tmp_path / "nucleus.toml"
    path.write_text(f'[[ledgers]]\nid = "main"\n{ledger}\n{modules}')
    return path


CASES = {
    "unknown depends_on": (
        'storage = ":memory:"',
        '[[ledgers.modules]]\nuse = "kind-counter"\ndepends_on = ["nope"]\n',
        "module 'kind-counter' depends on unknown module 'nope'",
    ),
    "dependency cycle": (
        'storage = ":memory:"',
        '[[ledgers.modules]]\nuse = "kind-counter"\ndepends_on = ["require-fields"]\n'
        '[[ledgers.modules]]\nuse = "require-fields"\ndepends_on = ["kind-counter"]\n'
        'config = { fields = ["x"] }\n',
        "dependency cycle among: kind-counter -> require-fields",
    ),
    "built-in module config": (
        'storage = ":memory:"',
        '[[ledgers.modules]]\nuse = "kind-counter"\nconfig = { index = "yes" }\n',
        "config 'index' must be true or false, got 'yes'",
    ),
    "json-schema config": (
        'storage = ":memory:"',
        '[[ledgers.modules]]\nuse = "json-schema"\nconfig.schemas.note = { type = 5 }\n',
        r"config 'schemas'\['note'\] is not a valid JSON Schema",
    ),
    "user module config": (
        'storage = ":memory:"',
        '[[ledgers.modules]]\nuse = "mymods:Picky"\nconfig = { level = 9 }\n',
        "config 'level' must be 1, 2 or 3, got 9",
    ),
    "missing storage directory": (
        'storage = "no/such/dir/main.db"',
        "",
        "directory .*no/such/dir does not exist",
    ),
    "storage is a directory": (
        'storage = "adir"',
        "",
        "adir is not a regular file",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_refuses_what_run_refuses_and_both_exit_2(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger, modules, message = CASES[case]
    (tmp_path / "mymods.py").write_text(MODULES)
    (tmp_path / "adir").mkdir()
    config = _config(tmp_path, ledger, modules)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what main() does for the console script
    monkeypatch.delitem(sys.modules, "mymods", raising=False)
    checked = runner.invoke(app, ["check", str(config)])
    assert checked.exit_code == 2, checked.output
    assert re.search(message, checked.stderr), checked.stderr
    ran = subprocess.run(
        [sys.executable, "-m", "nucleus_actors", "run", str(config), "--port", "0"],
        capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr
    assert "listening on" not in ran.stderr
    assert re.search(message, ran.stderr), ran.stderr


def test_a_good_config_still_checks_ok(tmp_path: Path) -> None:
    (tmp_path / "mymods.py").write_text(MODULES)
    config = _config(
        tmp_path,
        'storage = "main.db"',
        '[[ledgers.modules]]\nuse = "mymods:Picky"\nconfig = { level = 2 }\n'
        '[[ledgers.modules]]\nuse = "kind-counter"\ndepends_on = ["picky"]\n',
    )
    result = subprocess.run(
        [sys.executable, "-m", "nucleus_actors", "check", str(config)],
        capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{config}: ok" in result.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_an_unwritable_storage_directory_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        config = _config(tmp_path, f"storage = {toml_str(locked / 'main.db')}")
        result = runner.invoke(app, ["check", str(config)])
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2
    assert "permission denied" in result.stderr


def test_the_console_script_finds_modules_in_the_working_directory(tmp_path: Path) -> None:
    script = shutil.which("nucleus", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the nucleus console script is not installed beside this Python")
    (tmp_path / "mymods.py").write_text(MODULES)
    config = _config(
        tmp_path, 'storage = ":memory:"', '[[ledgers.modules]]\nuse = "mymods:Picky"\n'
        "config = { level = 1 }\n"
    )  # fmt: skip
    via_script = subprocess.run(
        [script, "check", str(config)],
        capture_output=True, text=True, cwd=tmp_path, env=subprocess_env(), timeout=60,
    )  # fmt: skip
    assert via_script.returncode == 0, via_script.stderr
    via_module = nucleus("check", str(config))  # python -m, from the repo's directory
    assert via_module.returncode == 2  # mymods.py is not in *its* working directory


# -- hook signatures at register -------------------------------------------------------------
class OneArgAfter(Module):
    id = "one-arg"

    async def after_append(self, record: Record) -> None:  # type: ignore[override]
        pass


class PlainBefore(Module):
    id = "plain"

    def before_append(self, record: Record) -> Record | None:  # type: ignore[override]
        return None


class PlainStop(Module):
    id = "plain-stop"

    def stop(self, ctx: Any) -> None:  # type: ignore[override]
        pass


class ExtraRequired(Module):
    id = "extra"

    async def init(self, ctx: Any, other: Any) -> None:  # type: ignore[override]
        pass


class Flexible(Module):
    id = "flexible"

    async def after_append(self, record: Record, hash: Hash, *more: Any, flag: int = 0) -> None:
        pass

    async def before_append(self, *args: Any) -> Record | None:
        return None

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        pass


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (OneArgAfter, r"'one-arg': after_append\(record\) cannot be called with the 2 "
         r"argument\(s\) the runtime passes \(record, hash\)"),
        (PlainBefore, r"'plain': before_append is a plain function, the runtime awaits it: "
         r"write `async def before_append\(self, record\)`"),
        (PlainStop, r"'plain-stop': stop is a plain function"),
        (ExtraRequired, r"'extra': init\(ctx, other\) cannot be called with the 1"),
    ],
)  # fmt: skip
def test_a_wrong_hook_signature_is_refused_at_register(cls: type[Module], match: str) -> None:
    engine = LedgerEngine(LedgerConfig(ledger_id="t"))
    with pytest.raises(RegistryError, match=match) as info:
        engine.register(cls)
    assert info.value.module_id == cls.id
    assert [handle.id for handle in engine.modules] == []


def test_flexible_but_compatible_hooks_register() -> None:
    engine = LedgerEngine(LedgerConfig(ledger_id="t"))
    engine.register(Flexible)
    assert [handle.id for handle in engine.modules] == ["flexible"]
