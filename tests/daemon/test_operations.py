"""Operations: access log, request ids, env overrides, SIGHUP reload, read tokens, TLS."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import DaemonProcess

BASE = """
[[ledgers]]
id = "main"
storage = ":memory:"

[[ledgers.modules]]
use = "tests.daemon.testmods:Explode"
"""


def write(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "nucleus.toml"
    config.write_text(text)
    return config


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def json_lines(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.lines if line.startswith("{")]


def test_access_log_lines_and_request_ids(start_daemon: Any, tmp_path: Path) -> None:
    daemon = start_daemon(write(tmp_path, BASE))
    url = daemon.url
    record = {"kind": "note", "payload": 1}
    given = httpx.post(f"{url}/v1/ledgers/main/records", json=record,
                       headers={"X-Request-Id": "req-42.a"})  # fmt: skip
    assert given.status_code == 201
    assert given.headers["x-request-id"] == "req-42.a"
    made = httpx.get(f"{url}/v1/ledgers/main/head", headers={"X-Request-Id": "x" * 129})
    rid = made.headers["x-request-id"]
    assert rid != "x" * 129
    assert len(rid) == 32
    int(rid, 16)
    bad = httpx.get(f"{url}/v1/ledgers/main/head", headers={"X-Request-Id": "two words"})
    assert bad.headers["x-request-id"] != "two words"
    line = daemon.wait_log(r'"POST /v1/ledgers/main/records" 201')
    assert "nucleus_actors.daemon.access" in line
    assert "127.0.0.1:" in line
    assert f" {len(given.content)}B " in line
    assert line.endswith("[request_id=req-42.a]")
    assert "ms [request_id" in line
    daemon.wait_log(rf'"GET /v1/ledgers/main/head" 200 .*\[request_id={rid}\]')


def test_json_log_lines_carry_the_request_id_in_every_line(
    start_daemon: Any, tmp_path: Path
) -> None:
    # NUCLEUS_LOG_FORMAT overrides the file's log_format
    daemon = start_daemon(write(tmp_path, 'log_format = "text"\n' + BASE),
                          NUCLEUS_LOG_FORMAT="json")  # fmt: skip
    response = httpx.post(
        f"{daemon.url}/v1/ledgers/main/records",
        json={"kind": "explode", "payload": 1},
        headers={"X-Request-Id": "boom-1"},
    )
    assert response.status_code == 503
    wait_for(lambda: any(e.get("path") == "/v1/ledgers/main/records"
                         for e in json_lines(daemon)), "access line")  # fmt: skip
    entries = [e for e in json_lines(daemon) if e.get("request_id") == "boom-1"]
    access = [e for e in entries if e["logger"] == "nucleus_actors.daemon.access"]
    assert len(access) == 1
    assert {k: access[0][k] for k in ("method", "path", "status")} == {
        "method": "POST",
        "path": "/v1/ledgers/main/records",
        "status": 503,
    }
    assert access[0]["bytes"] == len(response.content)
    assert access[0]["duration_ms"] >= 0
    assert access[0]["client"].startswith("127.0.0.1:")
    # the warning the request caused carries its id too
    assert any(e["level"] == "WARNING" and "explode on cue" in e["message"] for e in entries)


def test_no_access_log_flag_and_env_precedence(start_daemon: Any, tmp_path: Path) -> None:
    config = write(tmp_path, 'log_format = "json"\n' + BASE)
    # the flag beats the environment, which beats the file
    daemon = start_daemon(config, "--no-access-log", "--log-format", "text",
                          NUCLEUS_LOG_FORMAT="json")  # fmt: skip
    httpx.get(f"{daemon.url}/v1/ledgers/main/head")
    httpx.get(f"{daemon.url}/healthz")
    assert daemon.stop() == 0
    assert not json_lines(daemon)
    assert "nucleus_actors.daemon.access" not in daemon.log


def test_env_host_port_and_bad_values(tmp_path: Path) -> None:
    config = write(tmp_path, "port = 1\n" + BASE)
    proc = subprocess.run(
        [*_nucleus(), "run", str(config)], capture_output=True, text=True, timeout=60,
        env=_env(NUCLEUS_PORT="70000"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "$NUCLEUS_PORT must be a port number (0..65535), got '70000'" in proc.stderr
    proc = subprocess.run(
        [*_nucleus(), "run", str(config)], capture_output=True, text=True, timeout=60,
        env=_env(NUCLEUS_LOG_LEVEL="loud"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "$NUCLEUS_LOG_LEVEL must be debug, info, warning or error, got 'loud'" in proc.stderr
    # NUCLEUS_PORT and NUCLEUS_HOST override the file (port 1 would need root)
    daemon = DaemonProcess.__new__(DaemonProcess)
    try:
        _start_without_port_flag(daemon, config, NUCLEUS_PORT="0", NUCLEUS_HOST="127.0.0.1")
        assert daemon.wait_listening().startswith("http://127.0.0.1:")
        assert daemon.stop() == 0
    finally:
        daemon.close()


def _nucleus() -> list[str]:
    import sys

    return [sys.executable, "-m", "nucleus_actors"]


def _env(**extra: str) -> dict[str, str]:
    from .conftest import subprocess_env

    return subprocess_env(**extra)


def _start_without_port_flag(daemon: DaemonProcess, config: Path, **env: str) -> None:
    """DaemonProcess without its `--port 0` (to see the environment's port win)."""
    import threading

    daemon.proc = subprocess.Popen(
        [*_nucleus(), "run", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env=_env(**env),
    )  # fmt: skip
    daemon.lines, daemon.url = [], None
    daemon._changed = threading.Condition()
    daemon._eof = False
    daemon._reader = threading.Thread(target=daemon._read, daemon=True)
    daemon._reader.start()


RELOADABLE = """
token_file = "token.txt"
log_level = "info"
[[ledgers]]
id = "main"
storage = ":memory:"

[[ledgers.modules]]
use = "tests.daemon.testmods:Tunable"
config = { label = "@LABEL@" }

[[ledgers.modules]]
use = "tests.daemon.testmods:Explode"
config = { n = @N@ }
"""


def test_sighup_reloads_tokens_log_level_and_module_config(
    start_daemon: Any, tmp_path: Path
) -> None:
    (tmp_path / "token.txt").write_text("first\n")
    config = write(tmp_path, RELOADABLE.replace("@LABEL@", "one").replace("@N@", "1"))
    daemon = start_daemon(config)
    url = daemon.url
    record = {"kind": "note", "payload": 1}

    def post(token: str) -> int:
        return httpx.post(f"{url}/v1/ledgers/main/records", json=record,
                          headers={"Authorization": f"Bearer {token}"}).status_code  # fmt: skip

    assert post("first") == 201
    (tmp_path / "token.txt").write_text("second\n")
    config.write_text(
        RELOADABLE.replace("@LABEL@", "two").replace("@N@", "2")
        .replace('log_level = "info"', 'log_level = "debug"')
        .replace('storage = ":memory:"', 'storage = ":memory:"\nmax_record_bytes = 4096')
    )  # fmt: skip
    daemon.send(signal.SIGHUP)
    daemon.wait_log("SIGHUP: tokens replaced")
    daemon.wait_log("SIGHUP: log level is now debug")
    daemon.wait_log("SIGHUP: module 'tunable' of ledger 'main' reconfigured")
    daemon.wait_log("SIGHUP: module 'explode' of ledger 'main' has no reconfigure")
    daemon.wait_log("SIGHUP: ledger 'main' settings changed: restart the daemon to apply")
    assert post("first") == 401
    assert post("second") == 201
    modules = httpx.get(f"{url}/v1/ledgers/main/modules").json()["modules"]
    assert modules[0]["info"] == {"label": "two"}
    # a configuration that does not load changes nothing and does not stop the daemon
    config.write_text("this is not toml = =")
    daemon.send(signal.SIGHUP)
    daemon.wait_log("SIGHUP: the configuration does not load; nothing reloaded")
    assert post("second") == 201
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0  # SIGTERM stays graceful


def test_reads_need_a_token_when_configured(start_daemon: Any, tmp_path: Path) -> None:
    config = write(tmp_path, 'reads = "token"\n' + BASE)
    daemon = start_daemon(config, NUCLEUS_TOKEN="writer", NUCLEUS_READ_TOKEN="reader")
    url = daemon.url

    def get(path: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(url + path, headers=headers).status_code

    assert get("/v1/ledgers", None) == 401
    assert get("/v1/ledgers", "wrong") == 401
    assert get("/v1/ledgers", "reader") == 200
    assert get("/v1/ledgers/main/head", "writer") == 200
    assert get("/metrics", None) == 401
    assert get("/healthz", None) == 200
    assert get("/openapi.json", None) == 200
    record = {"kind": "note", "payload": 1}
    refused = httpx.post(f"{url}/v1/ledgers/main/records", json=record,
                         headers={"Authorization": "Bearer reader"})  # fmt: skip
    assert refused.status_code == 401  # the read token does not write


def test_reads_token_without_any_token_is_a_config_error(tmp_path: Path) -> None:
    config = write(tmp_path, 'reads = "token"\n' + BASE)
    proc = subprocess.run([*_nucleus(), "run", str(config)], capture_output=True, text=True,
                          timeout=60, env=_env(), check=False)  # fmt: skip
    assert proc.returncode == 2
    assert 'reads = "token" needs a read token or an API token' in proc.stderr


def test_tls_with_a_self_signed_certificate(start_daemon: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    config = write(tmp_path, 'tls_cert = "cert.pem"\ntls_key = "key.pem"\n' + BASE)
    daemon = start_daemon(config)
    assert daemon.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(cert))
    with httpx.Client(verify=context) as api:
        response = api.post(f"{daemon.url}/v1/ledgers/main/records",
                            json={"kind": "note", "payload": "secret"})  # fmt: skip
        assert response.status_code == 201
        assert api.get(f"{daemon.url}/v1/ledgers/main/head").json()["length"] == 1
    with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
        httpx.get(f"{daemon.url}/healthz")
    plain = daemon.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{plain}/healthz")


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    config = write(tmp_path, 'tls_cert = "cert.pem"\n' + BASE)
    proc = subprocess.run([*_nucleus(), "check", str(config)], capture_output=True, text=True,
                          timeout=60, env=_env(), check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "tls_cert and tls_key go together" in proc.stdout + proc.stderr


async def test_the_docs_page_works_offline() -> None:
    from nucleus_actors.daemon import DaemonState, create_app

    app = create_app(DaemonState({}, token=None, max_body_bytes=1024))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
        page = await api.get("/docs")
        assert page.status_code == 200
        html = page.text
        # every script and stylesheet is served by the daemon itself: no CDN
        assert "cdn" not in html.lower()
        assert "https://" not in html.replace("https://swagger.io", "")
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
            assert f"/docs/assets/{asset}" in html
            response = await api.get(f"/docs/assets/{asset}")
            assert response.status_code == 200
            assert len(response.content) > 500
        assert (await api.get("/docs/assets/../../etc/passwd")).status_code == 404
        assert (await api.get("/docs/assets/index.html")).status_code == 404
        assert "/docs" not in (await api.get("/openapi.json")).json()["paths"]
