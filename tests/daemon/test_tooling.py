"""Daemon tooling against a real `nucleus run` subprocess: client commands (status, append,
tail, export), module discovery (built-in names, entry points), built-in modules, /metrics.

Client commands run in process (typer's CliRunner) against the daemon over HTTP, except where
the console script itself or a long-running `tail --follow` matters (subprocesses).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner, Result

from nucleus_actors.cli import app
from nucleus_actors.daemon.metrics import METRICS
from nucleus_actors.hashing import genesis

from .conftest import REPO, DaemonProcess, client, subprocess_env, toml_str

TOKEN = "tooling-token"
runner = CliRunner()

# A distribution installed "by hand": a package and its .dist-info (with entry points) in a
# directory put on PYTHONPATH; importlib.metadata finds it like any installed distribution.
STAMP_MODULE = '''
from nucleus_actors import Module, Record


class Stamp(Module):
    """Adds meta stamp=<config.value> to every record."""

    id = "stamp"
    version = "2.5.0"

    async def init(self, ctx):
        self.value = ctx.config.get("value", "stamped")

    async def before_append(self, record: Record):
        return record.with_meta(stamp=self.value)


class NotAModule:
    pass
'''
ENTRY_POINTS = """\
[nucleus_actors.modules]
acme-stamp = acme_stamp:Stamp
acme-broken = acme_stamp:NotAModule
kind-counter = acme_stamp:Stamp
"""


def install_fake_distribution(
    site: Path, name: str = "acme-stamp", version: str = "1.2.3", entry_points: str = ENTRY_POINTS
) -> Path:
    package = site / "acme_stamp"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(STAMP_MODULE)
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def pythonpath(*extra: Path) -> str:
    return os.pathsep.join([str(REPO), *map(str, extra)])


CONFIG = """
[[ledgers]]
id = "main"
storage = "main.db"

[[ledgers.modules]]
use = "acme-stamp"
config = { value = "acme" }

[[ledgers.modules]]
use = "json-schema"
[ledgers.modules.config.schemas."order.created"]
type = "object"
required = ["customer"]
properties = { items = { type = "array", items = { type = "integer", minimum = 1 } } }

[[ledgers.modules]]
use = "kind-counter"
config = { index = true }

[[ledgers.modules]]
use = "jsonl-mirror"
config = { path = @MIRROR@ }

[[ledgers]]
id = "aux"
storage = ":memory:"
"""


class Env:
    """The shared daemon and what the tests need to talk to it."""

    def __init__(self, daemon: DaemonProcess, directory: Path, site: Path) -> None:
        assert daemon.url is not None
        self.daemon = daemon
        self.url = daemon.url
        self.directory = directory
        self.site = site
        self.mirror = directory / "mirror.jsonl"

    def cli(self, *args: str, input: str | None = None, token: str | None = TOKEN) -> Result:
        """`nucleus ARGS --url URL` in process, with $NUCLEUS_TOKEN = token."""
        env = {"NUCLEUS_TOKEN": token or "", "NUCLEUS_URL": self.url}
        return runner.invoke(app, list(args), input=input, env=env)

    def length(self, ledger: str = "main") -> int:
        with client(self.url) as api:
            value: int = api.get(f"/v1/ledgers/{ledger}/head").json()["length"]
        return value


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    directory = tmp_path_factory.mktemp("tooling")
    site = install_fake_distribution(directory / "site")
    config = directory / "nucleus.toml"
    config.write_text(CONFIG.replace("@MIRROR@", toml_str(directory / "mirror.jsonl")))
    daemon = DaemonProcess(config, NUCLEUS_TOKEN=TOKEN, PYTHONPATH=pythonpath(site))
    try:
        daemon.wait_listening()
        yield Env(daemon, directory, site)
    finally:
        daemon.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll a condition of another process (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- append ----------------------------------------------------------------------------------
def test_append_one_record_and_json_lines_from_stdin(env: Env) -> None:
    before = env.length()
    one = env.cli("append", "-l", "main", "--kind", "note", "--json", '{"n": 1}', "-m", "k=v")
    assert one.exit_code == 0, one.output
    [receipt] = lines(one.stdout)
    assert receipt["seq"] == before
    entry = httpx.get(f"{env.url}/v1/ledgers/main/records/{before}").json()
    # the entry-point module (acme-stamp) ran in the daemon: its before_append added meta
    assert entry["meta"] == {"k": "v", "stamp": "acme"}
    assert entry["payload"] == {"n": 1}

    payloads = "".join(f'{{"n": {n}}}\n' for n in range(5)) + "\n"
    many = env.cli("append", "-l", "main", "-k", "tick", "--batch-size", "2", input=payloads)
    assert many.exit_code == 0, many.output
    assert [r["seq"] for r in lines(many.stdout)] == list(range(before + 1, before + 6))
    assert f"appended 5 record(s) to 'main': seqs {before + 1}..{before + 5}" in many.stderr

    records = '{"kind": "a", "payload": 1, "meta": {"x": "y"}}\n{"kind": "b", "payload": [2]}\n'
    whole = env.cli("append", "-l", "main", input=records)
    assert whole.exit_code == 0, whole.output
    assert env.length() == before + 8


def test_append_errors_name_the_line_and_what_was_stored(env: Env) -> None:
    before = env.length()
    bad_json = env.cli("append", "-l", "main", "-k", "t", input='{"n": 1}\n{"n": 2}\nnope\n')
    assert bad_json.exit_code == 2
    assert "stdin line 3: not JSON" in bad_json.stderr
    assert f"2 record(s) were appended before it (seqs {before}..{before + 1})" in bad_json.stderr
    assert env.length() == before + 2

    orders = '{"customer": "a"}\n{"customer": "b", "items": [1, 0]}\n'
    vetoed = env.cli("append", "-l", "main", "-k", "order.created", input=orders)
    assert vetoed.exit_code == 1
    assert "stdin line 2: module 'json-schema' rejected the record" in vetoed.stderr
    assert "at $.payload.items[1]: 0 is less than the minimum of 1" in vetoed.stderr
    assert "nothing of its batch was stored; nothing was appended" in vetoed.stderr
    assert env.length() == before + 2

    shape = env.cli("append", "-l", "main", input='{"payload": 1}\n')
    assert shape.exit_code == 2
    assert 'each line must be an object with "kind" and "payload"' in shape.stderr
    invalid = env.cli("append", "-l", "main", "-k", "bad kind", "--json", "1")
    assert invalid.exit_code == 2
    assert "kind 'bad kind' contains whitespace" in invalid.stderr
    assert env.cli("append", "-l", "main", "--json", "1").exit_code == 2  # no --kind
    not_json = env.cli("append", "-l", "main", "-k", "t", "--json", "{")
    assert not_json.exit_code == 2
    assert "--json: not JSON" in not_json.stderr
    which = env.cli("append", "-k", "t", "--json", "1")  # two ledgers, no --ledger
    assert which.exit_code == 2
    assert "the daemon serves 2 ledgers (main, aux): choose one with --ledger" in which.stderr
    unknown = env.cli("append", "-l", "nope", "-k", "t", "--json", "1")
    assert unknown.exit_code == 2
    assert "no ledger 'nope' in this daemon" in unknown.stderr
    assert env.length() == before + 2


def test_wrong_or_missing_token_exits_4(env: Env) -> None:
    before = env.length()
    missing = env.cli("append", "-l", "main", "-k", "t", "--json", "1", token=None)
    assert missing.exit_code == 4
    assert "it needs its API token and $NUCLEUS_TOKEN is not set" in missing.stderr
    wrong = env.cli("append", "-l", "main", "-k", "t", "--json", "1", token="nope")
    assert wrong.exit_code == 4
    assert "$NUCLEUS_TOKEN holds a token the daemon does not accept" in wrong.stderr
    assert "Traceback" not in wrong.output
    assert env.length() == before


@pytest.mark.parametrize(
    "command",
    [["status"], ["append", "-l", "x", "-k", "t", "--json", "1"], ["tail"], ["export"]],
)
def test_unreachable_daemon_exits_3(command: list[str]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = runner.invoke(app, [*command, "--url", f"http://127.0.0.1:{port}"])
    assert result.exit_code == 3, result.output
    assert f"cannot reach the daemon at http://127.0.0.1:{port}: connection failed" in (
        result.stderr
    )
    assert "Traceback" not in result.output


def test_a_url_that_is_not_a_daemon_exits_3(tmp_path: Path) -> None:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "ledgers").write_text("<html>not json</html>")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            ok_but_html = runner.invoke(app, ["status", "--url", url])
            missing = runner.invoke(app, ["tail", "--url", url + "/nowhere"])
        finally:
            server.shutdown()
            thread.join()
    for result in (ok_but_html, missing):
        assert result.exit_code == 3, result.output
        assert "it does not look like a nucleus daemon (check --url)" in result.stderr


# -- status ----------------------------------------------------------------------------------
def test_status_shows_ledgers_modules_and_module_reports(env: Env) -> None:
    env.cli("append", "-l", "main", "-k", "order.created", "--json", '{"customer": "z"}')
    length = env.length()
    result = env.cli("status")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"ledger main: running, {length} entries, head " in out
    assert "ledger aux: running, 0 entries" in out
    for module in ("stamp", "json-schema", "kind-counter", "jsonl-mirror"):
        assert f"\n{module} " in out, module
    assert f"kind-counter: total={length}; kinds: " in out
    assert "json-schema: kinds: order.created; checked=" in out

    as_json = env.cli("status", "--json", "-l", "main")
    assert as_json.exit_code == 0
    [ledger] = json.loads(as_json.stdout)["ledgers"]
    assert ledger["ledger"] == "main"
    modules = {m["id"]: m for m in ledger["modules"]}
    counts = modules["kind-counter"]["info"]
    assert counts["total"] == length
    assert counts["kinds"]["order.created"] >= 1
    assert modules["jsonl-mirror"]["info"]["path"] == str(env.mirror)
    assert modules["stamp"]["version"] == "2.5.0"


# -- tail and export -------------------------------------------------------------------------
def test_tail_prints_the_last_entries_or_from_a_seq(env: Env) -> None:
    env.cli("append", "-l", "main", "-k", "t", input="1\n2\n3\n")
    length = env.length()
    last = env.cli("tail", "-l", "main", "-n", "2")
    assert last.exit_code == 0, last.output
    entries = lines(last.stdout)
    assert [e["seq"] for e in entries] == [length - 2, length - 1]
    assert set(entries[0]) == {"seq", "kind", "payload", "meta", "timestamp", "hash"}
    frm = env.cli("tail", "-l", "main", "--from", str(length - 3), "--format", "text")
    assert frm.exit_code == 0
    rows = frm.stdout.splitlines()
    assert len(rows) == 3
    assert rows[-1].split()[0] == str(length - 1)
    assert rows[-1].endswith(' t 3 {"stamp":"acme"}')
    assert env.cli("tail", "-l", "aux").stdout == ""


def test_export_verifies_the_chain_and_matches_the_jsonl_mirror(env: Env, tmp_path: Path) -> None:
    env.cli("append", "-l", "main", "-k", "t", input="".join(f"{n}\n" for n in range(40)))
    length = env.length()
    target = tmp_path / "out.jsonl"
    result = env.cli("export", "-l", "main", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert f"exported {length} entries of 'main' to {target}, chain verified" in result.stderr
    assert not target.with_name("out.jsonl.partial").exists()
    exported = target.read_bytes()
    header, *entries = lines(exported.decode())
    assert header == {
        "nucleus_export": 1,
        "ledger_id": "main",
        "from": 0,
        "prev": genesis("main").hex(),
    }
    assert [e["seq"] for e in entries] == list(range(length))
    # The mirror module copies every committed entry, in the same format.
    wait_until(lambda: env.mirror.read_bytes().count(b"\n") >= length + 1, "the mirror")
    assert env.mirror.read_bytes()[: len(exported)] == exported

    part = env.cli("export", "-l", "main", "--from", "3", "--to", "7", "--no-progress")
    assert part.exit_code == 0, part.output
    part_header, *part_entries = lines(part.stdout)
    assert [e["seq"] for e in part_entries] == [3, 4, 5, 6]
    assert part_header["from"] == 3
    assert part_header["prev"] == entries[2]["hash"]  # CHAIN_2: the slice verifies alone
    body = part.stdout.encode().split(b"\n", 1)[1]
    assert body == b"".join(exported.splitlines(keepends=True)[4:8])
    past = env.cli("export", "-l", "main", "--from", str(length + 5))
    assert past.exit_code == 2
    assert f"--from {length + 5} is past the end ({length})" in past.stderr


# -- discovery -------------------------------------------------------------------------------
def test_nucleus_modules_lists_builtins_and_entry_points(env: Env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nucleus_actors", "modules", "--json"],
        capture_output=True,
        text=True,
        env=subprocess_env(PYTHONPATH=pythonpath(env.site)),
        timeout=60,
    )
    assert result.returncode == 1, result.stderr  # acme-broken does not load
    rows = {(r["name"], r["distribution"]): r for r in json.loads(result.stdout)["modules"]}
    builtin = rows[("kind-counter", "nucleus_actors")]
    assert builtin["builtin"] is True
    assert builtin["target"] == "nucleus_actors.daemon.modules:KindCounter"
    for name in ("require-fields", "json-schema", "jsonl-mirror"):
        assert rows[(name, "nucleus_actors")]["error"] is None
    stamp = rows[("acme-stamp", "acme-stamp")]
    assert (stamp["distribution_version"], stamp["module_version"]) == ("1.2.3", "2.5.0")
    assert (stamp["target"], stamp["module_id"], stamp["builtin"]) == (
        "acme_stamp:Stamp",
        "stamp",
        False,
    )
    assert "not a subclass of nucleus_actors.Module" in rows[("acme-broken", "acme-stamp")]["error"]
    assert rows[("kind-counter", "acme-stamp")]["shadowed"] is True

    table = subprocess.run(
        [sys.executable, "-m", "nucleus_actors", "modules"],
        capture_output=True,
        text=True,
        env=subprocess_env(PYTHONPATH=pythonpath(env.site)),
        timeout=60,
    )
    row = r"\nacme-stamp +2\.5\.0 +acme-stamp 1\.2\.3 \(entry point\) +acme_stamp:Stamp\n"
    assert re.search(row, table.stdout), table.stdout
    assert "acme-broken: cannot load" in table.stdout
    assert "shadowed by the built-in of the same name" in table.stdout
    clean = runner.invoke(app, ["modules"])  # this environment: the built-ins only
    assert clean.exit_code == 0, clean.output
    assert "built-in (nucleus_actors " in clean.stdout


def test_a_bad_module_name_is_a_config_error_naming_ledger_entry_and_why(env: Env) -> None:
    config = env.directory / "bad.toml"
    config.write_text(
        '[[ledgers]]\nid = "books"\nstorage = ":memory:"\n'
        '[[ledgers.modules]]\nuse = "acme-stamp"\n'
        '[[ledgers.modules]]\nuse = "acme-nope"\n'
        '[[ledgers.modules]]\nuse = "acme-broken"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "nucleus_actors", "check", str(config)],
        capture_output=True,
        text=True,
        env=subprocess_env(PYTHONPATH=pythonpath(env.site)),
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "2 configuration errors" in result.stderr
    assert (
        "ledgers[0].modules[1].use (ledger 'books', module 'acme-nope'): use = 'acme-nope': "
        "no installed module has this name"
    ) in result.stderr
    assert "known names: acme-broken, acme-stamp, json-schema, jsonl-mirror, kind-counter" in (
        result.stderr
    )
    assert (
        "ledgers[0].modules[2].use (ledger 'books', module 'acme-broken'): use = 'acme-broken' "
        "(entry point of acme-stamp 1.2.3: 'acme_stamp:NotAModule') names <class "
        "'acme_stamp.NotAModule'>, which is not a subclass of nucleus_actors.Module"
    ) in result.stderr
    assert "Traceback" not in result.stderr


# -- metrics ---------------------------------------------------------------------------------
class Scrape:
    """The samples of one /metrics page, looked up by name and labels."""

    def __init__(self, url: str) -> None:
        response = httpx.get(f"{url}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples
        ]

    def __call__(self, name: str, **labels: str) -> float:
        found = [v for n, lab, v in self.samples if n == name and labels.items() <= lab.items()]
        assert len(found) == 1, (name, labels, found)
        return found[0]

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


def test_metrics_come_from_statistics_and_statuses(env: Env) -> None:
    before = Scrape(env.url)
    length = env.length()
    main = {"ledger": "main"}
    assert before("nucleus_ledger_entries", **main) == length
    assert before("nucleus_ledger_appends_total", **main) == length  # a fresh ledger file
    env.cli("append", "-l", "main", "-k", "order.created", "--json", '{"items": [1]}')  # vetoed
    env.cli("append", "-l", "main", "-k", "m", "--json", "1")
    after = Scrape(env.url)
    rejects = before("nucleus_ledger_rejects_total", **main)
    assert after("nucleus_ledger_rejects_total", **main) == rejects + 1
    assert after("nucleus_ledger_appends_total", **main) == length + 1
    assert after("nucleus_ledger_crashes_total", **main) == 0
    assert after("nucleus_ledger_restarts_total", **main) == 0
    assert after("nucleus_ledger_up", **main) == 1
    assert after("nucleus_ledger_up", ledger="aux") == 1
    assert after("nucleus_ledger_phase", phase="running", **main) == 1
    assert after("nucleus_ledger_phase", phase="failed", **main) == 0
    counter = {"ledger": "main", "module": "kind-counter"}
    assert after("nucleus_module_state", state="running", **counter) == 1
    assert after("nucleus_module_state", state="failed", **counter) == 0
    assert after("nucleus_module_incarnation", **counter) == 1
    assert after("nucleus_module_restarts_total", **counter) == 0
    assert after("nucleus_module_crashes_total", **counter) == 0
    assert after("nucleus_module_dropped_total", **counter) == 0
    assert after("nucleus_module_inbox_depth", **counter) >= 0
    wait_until(
        lambda: Scrape(env.url)("nucleus_module_processed_total", **counter) == length + 1,
        "kind-counter to process every delivery",
    )
    # Hook latency: one observation per hook call, for the hooks each class overrides only.
    final = Scrape(env.url)
    schema = {"ledger": "main", "module": "json-schema", "hook": "before_append"}
    calls = final("nucleus_module_hook_duration_seconds_count", **schema)
    assert calls >= 2
    assert final("nucleus_module_hook_duration_seconds_bucket", le="+Inf", **schema) == calls
    assert final("nucleus_module_hook_duration_seconds_sum", **schema) > 0
    count = final("nucleus_module_hook_duration_seconds_count", hook="after_append", **counter)
    assert count == length + 1
    assert not any(
        lab.get("module") == "json-schema" and lab.get("hook") == "after_append"
        for _, lab, _ in final.samples
    )
    # Every documented metric is served.
    names = final.names()
    for name, (kind, _, _) in METRICS.items():
        assert (f"{name}_count" if kind == "histogram" else name) in names, name


def test_json_schema_rejection_over_http_carries_the_paths(env: Env) -> None:
    with client(env.url, TOKEN) as api:
        response = api.post(
            "/v1/ledgers/main/records",
            json={"kind": "order.created", "payload": {"customer": "c", "items": ["x"]}},
        )
    assert response.status_code == 409
    problem = response.json()
    assert problem["module"] == "json-schema"
    assert problem["path"] == "$.payload.items[0]"
    assert problem["schema_path"] == "#/properties/items/items/type"
    assert "'x' is not of type 'integer'" in problem["reason"]


# -- restarts: tail --follow resumes, the mirror resumes -------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Tail:
    """`nucleus tail --follow` in a subprocess; stdout and stderr lines collected."""

    def __init__(self, *args: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nucleus_actors", "tail", "--follow", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(**env),
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def seqs(self) -> list[int]:
        return [json.loads(line)["seq"] for line in list(self.out)]

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        for thread in self._threads:
            thread.join(30)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return code


def append_many(url: str, count: int, kind: str = "t") -> None:
    with client(url) as api:
        response = api.post(
            "/v1/ledgers/main/records/batch",
            json={"records": [{"kind": kind, "payload": n} for n in range(count)]},
        )
        assert response.status_code == 201, response.text


def test_tail_follow_and_the_mirror_resume_after_the_daemon_is_killed(tmp_path: Path) -> None:
    port = free_port()
    mirror = tmp_path / "mirror.jsonl"
    config = tmp_path / "nucleus.toml"
    config.write_text(
        f'port = {port}\n[[ledgers]]\nid = "main"\nstorage = "main.db"\n'
        f'[[ledgers.modules]]\nuse = "jsonl-mirror"\nconfig = {{ path = {toml_str(mirror)} }}\n'
    )
    url = f"http://127.0.0.1:{port}"

    def start() -> DaemonProcess:
        daemon = DaemonProcess(config, "--port", str(port))  # the last --port wins
        assert daemon.wait_listening() == url
        return daemon

    daemon = start()
    tail = Tail("--from", "0", NUCLEUS_URL=url)
    try:
        append_many(url, 30)
        wait_until(lambda: len(tail.out) == 30, "tail to print 30 entries")
        wait_until(lambda: mirror.read_bytes().count(b"\n") == 31, "the mirror")
        daemon.proc.kill()  # kill -9: no clean stop, the connection drops
        daemon.wait()
        daemon.close()
        # A torn last line, as if the daemon had died in the middle of writing it.
        data = mirror.read_bytes()
        mirror.write_bytes(data[: len(data) - 20])
        wait_until(lambda: any("stream interrupted" in line for line in tail.err), "a retry")

        daemon = start()
        append_many(url, 10, kind="after")
        wait_until(lambda: len(tail.out) >= 40, "tail to resume")
        with client(url) as api:
            total = api.get("/v1/ledgers/main/head").json()["length"]
        assert total == 40
        wait_until(lambda: mirror.read_bytes().count(b"\n") == 41, "the mirror to resume")
        export = runner.invoke(app, ["export", "--url", url, "--no-progress"])
        assert export.exit_code == 0, export.output
        assert mirror.read_bytes() == export.stdout.encode()  # no gap, no duplicate, same bytes
    finally:
        code = tail.close()
        daemon.close()
    assert tail.seqs() == list(range(40)), tail.seqs()  # nothing skipped, nothing twice
    assert code == 130
    assert any("resuming from seq 30" in line for line in tail.err), tail.err
    kinds = [json.loads(line)["kind"] for line in mirror.read_text().splitlines()[1:]]
    assert kinds == ["t"] * 30 + ["after"] * 10
