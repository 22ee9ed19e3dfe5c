"""Tests on a PostgreSQL cluster the test starts itself (initdb + pg_ctl): a wrong password,
and PostgreSQL restarted under load."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from nucleus_actors import StorageError
from nucleus_actors.storage import PostgresStorage
from tests.daemon.conftest import DaemonProcess
from tests.postgres.cluster import PASSWORD, PASSWORD_ROLE
from tests.postgres.daemons import pg_config, role_of, wait_until
from tests.postgres.load import Load, check_acks, stored


async def test_a_wrong_password_is_a_clear_error(own_cluster: Any) -> None:
    where = f"{own_cluster.host}:{own_cluster.port}/postgres"
    wrong = PostgresStorage(f"postgresql://{PASSWORD_ROLE}:nope@{where}", schema="s")
    with pytest.raises(StorageError, match="password authentication failed") as caught:
        await wrong.open("main")
    assert "nope" not in str(caught.value)
    assert "password=***" in str(caught.value)
    right = PostgresStorage(f"postgresql://{PASSWORD_ROLE}:{PASSWORD}@{where}", schema="s")
    await right.open("main")
    assert right.epoch == 1
    await right.close()
    await trio.lowlevel.checkpoint()


@pytest.mark.slow
def test_postgres_restarted_under_load(tmp_path: Path, own_cluster: Any) -> None:
    """`pg_ctl restart` while 16 clients append: appends fail with clear 503s while it is
    down (none hangs: every request is answered), resume after, nothing acknowledged lost."""
    config = pg_config(tmp_path / "a.toml", own_cluster.dsn, "restart", lease=2.0)
    daemon = DaemonProcess(config)
    load: Load | None = None
    try:
        url = daemon.wait_listening()
        assert role_of(daemon) == "writer"
        load = Load([url], threads=16)
        load.start()
        wait_until(lambda: len(load.acks) > 50, what="appends before the restart")
        own_cluster.restart()
        restarted = time.monotonic()
        wait_until(
            lambda: load.first_ack_after(restarted + 0.5),
            timeout=60,
            what="appends after the restart",
        )
        load.stop()
        assert role_of(daemon) == "writer"
        entries = stored(own_cluster.dsn, "restart")
        check_acks(load.acks, entries)
        assert "ReadTimeout" not in load.errors, load.errors  # no request hung
        failed = sum(load.errors.values())
        print(f"\nrestart under load: {len(load.acks)} acknowledged, errors {load.errors}")
        assert failed > 0, "no append saw the restart (the test proves nothing)"
        assert set(load.errors) <= {"storage-unavailable", "ledger-unavailable"}, load.errors
        assert "PostgreSQL" in daemon.log
    finally:
        if load is not None:
            load.stop()
        daemon.close()
