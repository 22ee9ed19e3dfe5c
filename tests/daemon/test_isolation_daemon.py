"""`nucleus run` with `isolation = "process"`: the module runs in a worker process, a segfault
is a crash of that module only, and `/metrics` and `nucleus status` show its pid and restarts."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..isolation.test_isolation import alive, read_seen
from .conftest import DaemonProcess, client, nucleus, toml_str

CONFIG = """
[[ledgers]]
id = "iso"
storage = "iso.db"

[[ledgers.modules]]
use = "tests.isolation.modules:Seen"
isolation = "process"
memory_limit = 1073741824
timeout = 5.0
config = { path = @SEEN@ }

[[ledgers.modules]]
use = "kind-counter"
id = "counter"
isolation = "process"
"""


def append(api: httpx.Client, kind: str) -> httpx.Response:
    return api.post("/v1/ledgers/iso/records", json={"kind": kind, "payload": {}})


def modules(api: httpx.Client) -> dict[str, Any]:
    body = api.get("/v1/ledgers/iso/modules").json()
    return {m["id"]: m for m in body["modules"]}


def metric(text: str, name: str, module: str) -> float | None:
    pattern = re.compile(rf'^{name}\{{[^}}]*module="{re.escape(module)}"[^}}]*\}} (\S+)$', re.M)
    match = pattern.search(text)
    return None if match is None else float(match.group(1))


@pytest.mark.slow
def test_nucleus_run_with_an_isolated_module(tmp_path: Path, start_daemon: Any) -> None:
    seen = tmp_path / "seen.txt"
    config = tmp_path / "nucleus.toml"
    config.write_text(CONFIG.replace("@SEEN@", toml_str(seen)))
    daemon: DaemonProcess = start_daemon(config)
    url = daemon.url
    assert url is not None
    with client(url) as api:
        before = modules(api)
        pid = before["seen"]["pid"]
        assert isinstance(pid, int)
        assert pid != daemon.proc.pid
        assert alive(pid)
        assert isinstance(before["counter"]["pid"], int)
        for _ in range(3):
            assert append(api, "k").status_code == 201
        assert append(api, "segv").status_code == 201  # acknowledged: committed before it
        assert append(api, "k").status_code == 201
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = modules(api)
            restarted = now["seen"]["restarts"] == 1 and now["seen"]["state"] == "running"
            if restarted and set(range(5)) <= set(read_seen(seen)):
                break
            time.sleep(0.05)
        now = modules(api)
        assert now["seen"]["restarts"] == 1
        assert "worker exited by signal 11 (SIGSEGV)" in now["seen"]["last_error"]
        new_pid = now["seen"]["pid"]
        assert new_pid not in (None, pid)
        assert not alive(pid)
        assert set(read_seen(seen)) == set(range(5))
        # the kind counter (a built-in module) answered describe() from its worker
        assert now["counter"]["info"] is not None
        text = api.get("/metrics").text
        assert metric(text, "nucleus_module_worker_pid", "seen") == new_pid
        assert metric(text, "nucleus_module_restarts_total", "seen") == 1
    status = nucleus("status", "--url", url, "--json")
    report = json.loads(status.stdout)
    listed = {m["id"]: m for m in report["ledgers"][0]["modules"]}
    assert listed["seen"]["pid"] == new_pid
    assert listed["seen"]["restarts"] == 1
    table = nucleus("status", "--url", url)
    assert f'seen: worker pid {new_pid} (isolation = "process"), 1 restart(s)' in table.stdout
    assert daemon.stop() == 0, daemon.log
    assert not alive(new_pid)
    assert not os.path.exists(f"/proc/{now['counter']['pid']}/cmdline")


def test_check_refuses_process_settings_it_cannot_honour(tmp_path: Path) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(
        '[[ledgers]]\nid = "iso"\nstorage = ":memory:"\n\n'
        '[[ledgers.modules]]\nuse = "kind-counter"\nmemory_limit = 1000000000\n'
    )
    result = nucleus("check", str(config))
    assert result.returncode == 2, result
    assert 'memory_limit = 1000000000 needs isolation = "process"' in result.stderr + result.stdout
    config.write_text(
        '[[ledgers]]\nid = "iso"\nstorage = ":memory:"\n\n'
        '[[ledgers.modules]]\nuse = "kind-counter"\nisolation = "process"\n'
        "config = { since = 2024-01-01 }\n"
    )
    result = nucleus("check", str(config))
    assert result.returncode == 2, result
    assert "needs a config that is JSON" in result.stderr + result.stdout
