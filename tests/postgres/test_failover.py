"""Failover under load, fencing of a frozen writer: daemons as separate processes on one schema.

Failover times are printed (and written to $NUCLEUS_FAILOVER_REPORT as JSON when set) for the
benchmark's closing note."""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from tests.daemon.conftest import DaemonProcess, client, nucleus
from tests.postgres.daemons import logs_on_failure, pg_config, role_of, wait_until
from tests.postgres.load import Load, check_acks, stored

LEASE = 1.5
ROUNDS = 10


def _start(config: Path, started: list[DaemonProcess]) -> DaemonProcess:
    daemon = DaemonProcess(config)
    started.append(daemon)
    daemon.wait_listening()
    return daemon


@pytest.mark.slow
def test_failover_under_load_kill_9(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    configs = [
        pg_config(tmp_path / f"{name}.toml", pg_dsn, pg_schema, lease=LEASE) for name in "ab"
    ]
    started: list[DaemonProcess] = []
    load: Load | None = None
    try:
        writer = _start(configs[0], started)
        assert role_of(writer) == "writer"
        standby = _start(configs[1], started)
        wait_until(lambda: role_of(standby) == "standby", what="a standby")
        load = Load([writer.url, standby.url], threads=64)  # type: ignore[list-item]
        load.start()
        times: list[float] = []
        for round_ in range(ROUNDS):
            wait_until(lambda: load.first_ack_after(time.monotonic() - 0.2), what="acks")
            time.sleep(0.5)
            killed_url = writer.url
            killed_config = configs[0] if writer.proc.args[3] == str(configs[0]) else configs[1]
            t0 = time.monotonic()
            writer.proc.kill()  # kill -9: no lease release, no goodbye
            writer.close()
            first = wait_until(
                lambda t0=t0, url=killed_url: load.first_ack_after(t0, not_from=url),
                timeout=LEASE + 30,
                what=f"round {round_}: an append acknowledged by the new writer",
            )
            elapsed = first.at - t0
            times.append(elapsed)
            print(f"round {round_}: failover {elapsed:.2f} s")
            assert elapsed <= LEASE + 2.0, (
                f"round {round_}: failover took {elapsed:.2f} s (lease {LEASE} s):\n"
                + "\n".join(standby.lines[-30:])
            )
            # the killed daemon comes back as a standby of the new writer
            writer, standby = standby, _start(killed_config, started)
            load.set_urls([writer.url, standby.url])  # type: ignore[list-item]
            wait_until(lambda s=standby: role_of(s) == "standby", what="the restarted standby")
        load.stop()
        entries = stored(pg_dsn, pg_schema)
        check_acks(load.acks, entries)
        verified = nucleus("verify", pg_dsn, "--schema", pg_schema)
        assert verified.returncode == 0, verified.stderr
        assert f"ledger 'main' ok, {len(entries)} entries" in verified.stdout
        with client(writer.url) as api:
            metrics = api.get("/metrics").text
        assert 'nucleus_ledger_takeovers_total{ledger="main"} 1.0' in metrics
        report = {
            "rounds": len(times),
            "lease_timeout": LEASE,
            "failover_p50": statistics.median(times),
            "failover_max": max(times),
            "acknowledged": len(load.acks),
            "stored": len(entries),
            "errors": load.errors,
        }
        print(f"\nfailover: {json.dumps(report)}")
        if os.environ.get("NUCLEUS_FAILOVER_REPORT"):
            Path(os.environ["NUCLEUS_FAILOVER_REPORT"]).write_text(json.dumps(report))
        assert len(load.acks) > ROUNDS * 10
    finally:
        if load is not None:
            load.stop()
        for daemon in started:
            daemon.close()


@pytest.mark.slow
def test_a_frozen_writer_is_fenced(tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """SIGSTOP the writer past its lease: the standby takes over and appends; after SIGCONT
    the old writer's writes fail as fenced, none of them lands after the takeover, and it
    becomes a standby."""
    a = _start(pg_config(tmp_path / "a.toml", pg_dsn, pg_schema, lease=LEASE), [])
    b = _start(pg_config(tmp_path / "b.toml", pg_dsn, pg_schema, lease=LEASE), [])
    load_a: Load | None = None
    try:
        assert role_of(a) == "writer"
        wait_until(lambda: role_of(b) == "standby", what="a standby")
        load_a = Load([a.url], threads=8, tag="via-a")  # type: ignore[list-item]
        load_a.start()
        wait_until(lambda: len(load_a.acks) > 20, what="appends through a")
        a.send(signal.SIGSTOP)
        stopped_at = time.monotonic()
        with logs_on_failure(a=a, b=b):
            wait_until(lambda: role_of(b) == "writer", timeout=LEASE + 30, what="b's takeover")
        assert time.monotonic() - stopped_at > LEASE * 0.5  # b waited for the lease
        load_b = Load([b.url], threads=4, tag="via-b")  # type: ignore[list-item]
        load_b.start()
        wait_until(lambda: len(load_b.acks) > 20, what="appends through b")
        a.send(signal.SIGCONT)
        wait_until(lambda: role_of(a) == "standby", timeout=30, what="a to become a standby")
        time.sleep(0.5)
        load_a.stop()
        load_b.stop()
        with client(a.url) as api:
            refused = api.post("/v1/ledgers/main/records", json={"kind": "x", "payload": {}})
            assert refused.status_code == 503
            assert refused.json()["type"].endswith("/not-writer")
            metrics = api.get("/metrics").text
        assert 'nucleus_ledger_fenced_total{ledger="main"} 1.0' in metrics
        assert "fenced" in a.log
        entries = stored(pg_dsn, pg_schema)
        check_acks(load_a.acks + load_b.acks, entries)
        first_b = min(e.seq for e in entries if e.record.kind == "via-b")
        late = [e.seq for e in entries if e.record.kind == "via-a" and e.seq > first_b]
        assert late == [], f"the fenced writer committed entries after the takeover: {late}"
        # b's epoch is the newer one
        with client(b.url) as api:
            assert api.get("/readyz").json()["ledgers"]["main"]["epoch"] == 2
    finally:
        for load in (load_a,):
            if load is not None:
                load.stop()
        a.send(signal.SIGCONT) if a.proc.poll() is None else None
        a.close()
        b.close()
