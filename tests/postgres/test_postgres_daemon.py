"""Daemons as separate processes sharing one PostgreSQL schema: one writer, standbys that serve
reads, refuse writes, follow the head and take over."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from tests.daemon.conftest import client, nucleus, read_events
from tests.postgres.daemons import pg_config, role_of, wait_until


def test_one_writer_one_standby_and_a_clean_handover(
    tmp_path: Path, pg_dsn: str, pg_schema: str, start_daemon: Any
) -> None:
    config = pg_config(tmp_path / "a.toml", pg_dsn, pg_schema, lease=2.0)
    writer = start_daemon(config)
    assert role_of(writer) == "writer"
    standby = start_daemon(pg_config(tmp_path / "b.toml", pg_dsn, pg_schema, lease=2.0))
    assert role_of(standby) == "standby"
    with client(writer.url) as w, client(standby.url) as s:
        ready = w.get("/readyz").json()["ledgers"]["main"]
        assert ready == {"phase": "running", "role": "writer", "epoch": 1}
        assert w.get("/readyz", params={"role": "writer"}).status_code == 200
        refused = s.get("/readyz", params={"role": "writer"})
        assert refused.status_code == 503
        assert s.get("/readyz").status_code == 200  # a standby is ready to serve reads
        receipts = [
            w.post("/v1/ledgers/main/records", json={"kind": "k", "payload": {"n": n}}).json()
            for n in range(5)
        ]
        # the standby's head follows the database (polled every 0.25 s)
        head = wait_until(
            lambda: s.get("/v1/ledgers/main/head").json()["length"] == 5,
            what="the standby's head to reach 5",
        )
        assert head
        body = s.get("/v1/ledgers/main/head").json()
        assert body["head"] == receipts[-1]["hash"]
        assert (body["role"], body["epoch"]) == ("standby", 1)
        assert s.get("/v1/ledgers/main/records/4").json()["hash"] == receipts[4]["hash"]
        # writes on the standby: 503 not-writer, nothing stored (both routes)
        for path, payload in (
            ("/v1/ledgers/main/records", {"kind": "k", "payload": {}}),
            ("/v1/ledgers/main/records/batch", {"records": [{"kind": "k", "payload": {}}]}),
        ):
            answer = s.post(path, json=payload)
            assert answer.status_code == 503, answer.text
            assert answer.json()["type"].endswith("/not-writer")
        metrics = s.get("/metrics").text
        assert 'nucleus_ledger_writer{ledger="main"} 0.0' in metrics
        assert 'nucleus_ledger_epoch{ledger="main"} 1.0' in metrics
    # the writer stops cleanly: it releases the lease, the standby takes over at once
    assert writer.stop(signal.SIGTERM) == 0
    wait_until(lambda: role_of(standby) == "writer", timeout=10, what="the takeover")
    with client(standby.url) as s:
        assert s.get("/readyz").json()["ledgers"]["main"]["epoch"] == 2
        receipt = s.post("/v1/ledgers/main/records", json={"kind": "k", "payload": {"n": 5}})
        assert receipt.status_code == 201, receipt.text
        assert receipt.json()["seq"] == 5
        metrics = s.get("/metrics").text
        assert 'nucleus_ledger_takeovers_total{ledger="main"} 1.0' in metrics
        status = nucleus("status", "--url", standby.url)
        assert "writer at epoch 2" in status.stdout, status.stdout + status.stderr


def test_startup_config_errors_exit_2(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    bad = [
        ("postgresql://postgres@127.0.0.1:5432/no_such_db_nucleus", "does not exist"),
        ("postgresql://postgres@127.0.0.1:1/test", "cannot connect to PostgreSQL"),
        ("postgresql://u:pw@127.0.0.1/test", "holds a password"),
    ]
    for dsn, message in bad:
        config = pg_config(tmp_path / "bad.toml", dsn, pg_schema)
        result = nucleus("run", str(config), "--port", "0")
        assert result.returncode == 2, (dsn, result.stderr)
        assert message in result.stderr, result.stderr
        assert "pw" not in result.stderr.replace("password", "")
    # another ledger's schema
    first = pg_config(tmp_path / "one.toml", pg_dsn, pg_schema, ledger="one")
    assert nucleus("check", str(first)).returncode == 0
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # make the schema ledger one's
        conn.execute(f'CREATE SCHEMA "{pg_schema}"')
        conn.execute(f'CREATE TABLE "{pg_schema}".meta (key text PRIMARY KEY, value text)')
        conn.execute(f"INSERT INTO \"{pg_schema}\".meta VALUES ('ledger_id', 'one')")
    other = pg_config(tmp_path / "two.toml", pg_dsn, pg_schema, ledger="two")
    result = nucleus("run", str(other), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "holds ledger 'one', not 'two'" in result.stderr
    # the DSN from a file
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://postgres@127.0.0.1:5432/no_such_db_nucleus\n")
    config = pg_config(
        tmp_path / "file.toml", "postgresql://", pg_schema, extra=f'dsn_file = "{dsn_file}"'
    )
    result = nucleus("check", str(config))
    assert result.returncode == 2
    assert "no_such_db_nucleus" in result.stderr


def test_standby_streams_and_proofs_follow_and_roles_are_kept(
    tmp_path: Path, pg_dsn: str, pg_schema: str, start_daemon: Any
) -> None:
    """A standby's SSE stream and Merkle proofs follow the writer; `role = "standby"` never
    takes over; `role = "writer"` waits (503 on /readyz) and takes over when the lease frees."""
    writer = start_daemon(pg_config(tmp_path / "w.toml", pg_dsn, pg_schema, lease=2.0))
    assert role_of(writer) == "writer"
    replica = start_daemon(
        pg_config(tmp_path / "r.toml", pg_dsn, pg_schema, lease=2.0, role="standby")
    )
    waiting = start_daemon(
        pg_config(tmp_path / "x.toml", pg_dsn, pg_schema, lease=2.0, role="writer")
    )
    with client(writer.url) as w, client(replica.url) as r, client(waiting.url) as x:
        assert role_of(replica) == "standby"
        assert role_of(waiting) == "standby"
        not_ready = x.get("/readyz")
        assert not_ready.status_code == 503  # role = "writer" is not ready until it writes
        assert not_ready.json()["ledgers"]["main"]["role"] == "standby"
        with r.stream("GET", "/v1/ledgers/main/stream") as stream:
            assert stream.status_code == 200
            receipts = [
                w.post("/v1/ledgers/main/records", json={"kind": "k", "payload": {"n": n}}).json()
                for n in range(3)
            ]
            events = read_events(stream, 3)
        assert [int(e["id"]) for e in events] == [0, 1, 2]
        assert [json.loads(e["data"])["hash"] for e in events] == [x["hash"] for x in receipts]
        wait_until(lambda: r.get("/v1/ledgers/main/head").json()["length"] == 3, what="follow")
        for path, params in (
            ("/v1/ledgers/main/proof/inclusion", {"seq": 1, "size": 3}),
            ("/v1/ledgers/main/proof/consistency", {"from": 1, "to": 3}),
        ):
            on_standby, on_writer = r.get(path, params=params), w.get(path, params=params)
            assert on_standby.status_code == 200, on_standby.text
            assert on_standby.json() == on_writer.json()
    assert writer.stop(signal.SIGTERM) == 0
    wait_until(lambda: role_of(waiting) == "writer", timeout=15, what="the writer-role takeover")
    with client(waiting.url) as x:
        assert x.get("/readyz").status_code == 200
        assert (
            x.post("/v1/ledgers/main/records", json={"kind": "k", "payload": {}}).json()["seq"] == 3
        )
    assert role_of(replica) == "standby"  # a `standby` never takes over
