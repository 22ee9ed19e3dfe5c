"""The daemon's TOML configuration: validation, every error listed with its path, building."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nucleus_actors import Backoff, Overflow, Restart, Strategy
from nucleus_actors.cli import app
from nucleus_actors.daemon import (
    ConfigError,
    DaemonConfig,
    build_hosts,
    load_config,
    parse_config,
)

from .conftest import DaemonProcess


def parse(text: str, base_dir: Path = Path("/tmp")) -> DaemonConfig:
    return parse_config(tomllib.loads(text), base_dir=base_dir)


def problems(text: str, base_dir: Path = Path("/tmp")) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_hosts(parse(text, base_dir))
    return [str(p) for p in info.value.problems]


MINIMAL = '[[ledgers]]\nid = "main"\nstorage = ":memory:"\n'


def test_minimal_config_gets_the_documented_defaults() -> None:
    config = parse(MINIMAL)
    assert (config.host, config.port, config.token_env) == ("127.0.0.1", 8470, "NUCLEUS_TOKEN")
    assert config.on_ledger_failure == "exit"
    assert config.max_body_bytes == 4 << 20
    ledger = config.ledgers[0]
    engine_config = ledger.ledger_config()
    assert engine_config.ledger_id == "main"
    assert engine_config.strategy is Strategy.ONE_FOR_ONE
    assert (engine_config.max_restarts, engine_config.restart_window) == (3, 5.0)
    assert engine_config.max_record_bytes == 1 << 20
    assert ledger.storage_path(Path("/tmp")) is None


def test_module_options_become_a_module_spec() -> None:
    config = parse(
        MINIMAL
        + """
[ledgers.backoff]
initial = 0.5
[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:RequireFields"
id = "fields-2"
config = { a = [1, 2] }
restart = "transient"
shutdown = inf
timeout = inf
inbox = 8
overflow = "drop_oldest"
depends_on = ["x"]
backoff = { initial = 1, multiplier = 3 }
"""
    )
    ledger = config.ledgers[0]
    assert ledger.ledger_config().backoff == Backoff(initial=0.5)
    spec = ledger.modules[0].spec()
    assert spec.restart is Restart.TRANSIENT
    assert spec.shutdown is None  # inf waits forever
    assert spec.timeout is None  # inf = no limit
    assert (spec.inbox, spec.overflow, spec.depends_on) == (8, Overflow.DROP_OLDEST, ("x",))
    assert dict(spec.config) == {"a": [1, 2]}
    assert spec.backoff == Backoff(initial=1, multiplier=3)
    module = spec.module()  # type: ignore[operator]
    assert module.id == "fields-2"


def test_every_error_is_listed_with_its_path() -> None:
    text = """
port = 70000
colour = "blue"
on_ledger_failure = "panic"
[[ledgers]]
id = "main"
storage = "main.db"
max_restarts = "3"
strategy = "one_for_some"
[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:KindCounter"
inbox = 0
typo = true
"""
    with pytest.raises(ConfigError) as info:
        parse(text)
    found = [str(p) for p in info.value.problems]
    assert len(found) == 7, found
    expected_starts = [
        "port: Input should be less than or equal to 65535 (got 70000)",
        "on_ledger_failure: Input should be 'exit' or 'serve' (got 'panic')",
        "ledgers[0].strategy (ledger 'main'): Input should be",
        "ledgers[0].max_restarts (ledger 'main'): Input should be a valid integer (got '3')",
        "ledgers[0].modules[0].inbox (ledger 'main', module 'nucleus_actors.daemon.modules:"
        "KindCounter'): Input should be greater than or equal to 1 (got 0)",
        "ledgers[0].modules[0].typo (ledger 'main', module 'nucleus_actors.daemon.modules:"
        "KindCounter'): unknown key",
        "colour: unknown key",
    ]
    for start in expected_starts:
        assert any(line.startswith(start) for line in found), (start, found)
    assert str(info.value).startswith("<config>: 7 configuration errors\n  ")


@pytest.mark.parametrize(
    ("use", "message"),
    [
        ("no_such_package.mod:Thing", "cannot import 'no_such_package.mod'"),
        ("tests.daemon.testmods:Missing", "'tests.daemon.testmods' has no attribute 'Missing'"),
        ("tests.daemon.testmods:NOT_A_CLASS", "names 42, which is not a subclass of"),
        ("nucleus_actors:Record", "which is not a subclass of nucleus_actors.Module"),
        ("not-a-path", "use = 'not-a-path': no installed module has this name: it is not"),
        ("pkg.mod", "(did you mean 'package.module:Class'?)"),
        ("bad name!", "use must be 'package.module:Class' or the name of an installed module"),
        ("pkg.mod:", "use = 'pkg.mod:' is not of the form 'package.module:Class'"),
    ],
)
def test_a_bad_use_names_the_ledger_and_the_module_entry(use: str, message: str) -> None:
    text = MINIMAL + '[[ledgers.modules]]\nuse = "nucleus_actors.daemon.modules:KindCounter"\n'
    text += f'[[ledgers.modules]]\nuse = "{use}"\n'
    with pytest.raises(ConfigError) as info:
        parse(text)
    [problem] = info.value.problems
    assert problem.path == f"ledgers[0].modules[1].use (ledger 'main', module '{use}')"
    assert message in problem.message


def test_modules_that_cannot_be_registered_are_config_errors() -> None:
    text = MINIMAL + (
        '[[ledgers.modules]]\nuse = "tests.daemon.testmods:NeedsArgs"\n'
        '[[ledgers.modules]]\nuse = "nucleus_actors.daemon.modules:KindCounter"\n'
        '[[ledgers.modules]]\nuse = "nucleus_actors.daemon.modules:KindCounter"\n'
    )
    found = problems(text)
    assert len(found) == 2, found
    assert found[0].startswith(
        "ledgers[0].modules[0] (ledger 'main', module 'tests.daemon.testmods:NeedsArgs'): "
        "cannot register the module"
    )
    assert found[1].startswith("ledgers[0].modules[2] (ledger 'main', module 'nucleus_actors")
    assert "kind-counter" in found[1]
    # An `id` override runs one class twice.
    fixed = text.replace(
        'KindCounter"\n[[ledgers.modules]]', 'KindCounter"\nid = "other"\n[[ledgers.modules]]'
    ).replace('use = "tests.daemon.testmods:NeedsArgs"\n[[ledgers.modules]]\n', "")
    hosts = build_hosts(parse(fixed))
    assert [h.id for h in hosts["main"].engine.modules] == ["other", "kind-counter"]


def test_ledger_rules(tmp_path: Path) -> None:
    twice = MINIMAL + MINIMAL
    with pytest.raises(ConfigError, match=r"ledger id 'main' is used twice: ledgers\[0\] and"):
        parse(twice)
    same_file = (
        '[[ledgers]]\nid = "a"\nstorage = "x.db"\n[[ledgers]]\nid = "b"\nstorage = "./x.db"\n'
    )
    with pytest.raises(ConfigError, match=r"ledgers\[0\] and ledgers\[1\] use the same storage"):
        parse(same_file, tmp_path)
    missing_dir = '[[ledgers]]\nid = "a"\nstorage = "nope/x.db"\n'
    with pytest.raises(
        ConfigError, match=r"ledgers\[0\]\.storage: directory .*nope does not exist"
    ):
        parse(missing_dir, tmp_path)
    with pytest.raises(ConfigError, match=r"ledgers: List should have at least 1 item"):
        parse("ledgers = []")
    with pytest.raises(ConfigError, match=r"ledgers: Field required"):
        parse("port = 1")
    with pytest.raises(ConfigError, match=r"ledgers\[0\]\.id .*: must be 1\.\.128 letters"):
        parse('[[ledgers]]\nid = "has space"\nstorage = ":memory:"\n')


def test_storage_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    config_file = tmp_path / "nucleus.toml"
    config_file.write_text('[[ledgers]]\nid = "a"\nstorage = "data/a.db"\n')
    config = load_config(config_file)
    assert config.base_dir == tmp_path.resolve()
    assert config.ledgers[0].storage_path(config.base_dir) == (tmp_path / "data" / "a.db").resolve()


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: 1 configuration error\n  cannot read"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[ledgers]\n")
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 1"):
        load_config(bad)
    bad.write_bytes(b"port = '\xff'\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        load_config(bad)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_body_bytes", "10"),
        ("graceful_timeout", "0"),
        ("graceful_timeout", "inf"),
        ("token_env", '"1X"'),
        ("port", "true"),
        ("port", '"80"'),
        ("host", '""'),
    ],
)
def test_bad_daemon_values(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {key}: "):
        parse(f"{key} = {value}\n" + MINIMAL)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("timeout", "0"),
        ("shutdown", "-1"),
        ("shutdown", "nan"),
        ("inbox", "1.5"),
        ("restart", '"sometimes"'),
        ("overflow", '"spill"'),
        ("depends_on", '"x"'),
        ("config", "[1]"),
        ("id", '"-x"'),
    ],
)
def test_bad_module_values(key: str, value: str) -> None:
    text = MINIMAL + '[[ledgers.modules]]\nuse = "nucleus_actors.daemon.modules:KindCounter"\n'
    with pytest.raises(ConfigError, match=rf"ledgers\[0\]\.modules\[0\]\.{key} "):
        parse(text + f"{key} = {value}\n")


def test_check_command_reports_all_problems_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text('port = -1\nextra = 1\n[[ledgers]]\nid = "m"\nstorage = ":memory:"\n')
    result = CliRunner().invoke(app, ["check", str(config)])
    assert result.exit_code == 2
    assert "2 configuration errors" in result.stderr
    assert "port: Input should be greater than or equal to 0 (got -1)" in result.stderr
    assert "extra: unknown key" in result.stderr
    assert "Traceback" not in result.output + result.stderr

    config.write_text(
        MINIMAL + '[[ledgers.modules]]\nuse = "nucleus_actors.daemon.modules:KindCounter"\n'
    )
    ok = CliRunner().invoke(app, ["check", str(config)])
    assert ok.exit_code == 0, ok.output
    assert "ledger 'main': in memory; nucleus_actors.daemon.modules:KindCounter" in ok.stdout


def test_run_with_a_bad_config_exits_2_listing_every_error(tmp_path: Path) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(
        'bogus = 1\n[[ledgers]]\nid = "main"\nstorage = ":memory:"\n'
        '[[ledgers.modules]]\nuse = "no_such_pkg:Thing"\n'
    )
    daemon = DaemonProcess(config)
    try:
        assert daemon.wait() == 2
    finally:
        daemon.close()
    assert "2 configuration errors" in daemon.log
    assert "ledgers[0].modules[0].use (ledger 'main', module 'no_such_pkg:Thing')" in daemon.log
    assert "bogus: unknown key" in daemon.log
    assert "Traceback" not in daemon.log


def test_unknown_dependency_is_a_config_error_at_startup(tmp_path: Path) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(
        MINIMAL + '[[ledgers.modules]]\nuse = "nucleus_actors.daemon.modules:KindCounter"\n'
        'depends_on = ["ghost"]\n'
    )
    daemon = DaemonProcess(config)
    try:
        assert daemon.wait() == 2
    finally:
        daemon.close()
    # Found before anything starts (the same check as `nucleus check`).
    assert "ledgers[0].modules[0].depends_on (ledger 'main', module 'kind-counter')" in daemon.log
    assert "depends on unknown module 'ghost'" in daemon.log
    assert "listening on" not in daemon.log


def fake_distribution(site: Path, name: str, entry_points: dict[str, str]) -> None:
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[nucleus_actors.modules]\n{lines}")


def test_use_by_name_builtins_entry_points_and_ambiguity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_distribution(tmp_path, "one", {"audit": "tests.daemon.testmods:StopMarker"})
    fake_distribution(tmp_path, "two", {"twice": "tests.daemon.testmods:StopMarker"})
    fake_distribution(tmp_path, "three", {"twice": "tests.daemon.testmods:Explode"})
    fake_distribution(tmp_path, "four", {"kind-counter": "tests.daemon.testmods:Explode"})
    monkeypatch.syspath_prepend(str(tmp_path))
    from nucleus_actors.daemon.config import resolve_use
    from nucleus_actors.daemon.modules import KindCounter
    from tests.daemon.testmods import StopMarker

    assert resolve_use("audit") is StopMarker
    assert resolve_use("kind-counter") is KindCounter  # a built-in name is never shadowed
    with pytest.raises(ValueError, match=r"use = 'twice' is ambiguous: several distributions"):
        resolve_use("twice")
    text = MINIMAL + '[[ledgers.modules]]\nuse = "audit"\nconfig = { dir = "/tmp" }\n'
    text += '[[ledgers.modules]]\nuse = "twice"\n'
    with pytest.raises(ConfigError) as info:
        parse(text)
    [problem] = info.value.problems
    assert problem.path == "ledgers[0].modules[1].use (ledger 'main', module 'twice')"
    assert "three (tests.daemon.testmods:Explode), two (tests.daemon.testmods:StopMarker)" in (
        problem.message
    )


def test_durable_module_keys_and_cursor_interval() -> None:
    config = parse(
        MINIMAL
        + """cursor_interval = 0.25
[[ledgers.modules]]
use = "nucleus_actors.daemon.modules:KindCounter"
durable = true
start_at = "end"
[[ledgers.modules]]
use = "jsonl-mirror"
config = { path = "m.jsonl" }
"""
    )
    ledger = config.ledgers[0]
    assert ledger.ledger_config().cursor_interval == 0.25
    counter, mirror = (m.spec() for m in ledger.modules)
    assert (counter.durable, counter.start_at, counter.overflow) == (True, "end", None)
    assert mirror.durable  # it owns its position (resume_after): durable by nature
    # kind-counter keeps its counts with its position (resume_after): durable by nature too.
    assert (
        parse(MINIMAL + '[[ledgers.modules]]\nuse = "kind-counter"\n')
        .ledgers[0]
        .modules[0]
        .spec()
        .durable
    )
    assert parse(MINIMAL).ledgers[0].ledger_config().cursor_interval == 1.0


def test_stall_warning_key() -> None:
    assert parse(MINIMAL).ledgers[0].ledger_config().stall_warning == 0.1
    assert parse(MINIMAL + "stall_warning = 0.5\n").ledgers[0].ledger_config().stall_warning == 0.5
    off = parse(MINIMAL + "stall_warning = false\n").ledgers[0]
    assert off.ledger_config().stall_warning is None
    for bad in ("0", "-1", "true", '"0.1"'):
        with pytest.raises(ConfigError, match="stall_warning"):
            parse(MINIMAL + f"stall_warning = {bad}\n")
