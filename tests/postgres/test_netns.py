"""Two daemons as two hosts: each in its own network namespace, reaching a PostgreSQL cluster
the test starts on veth addresses. The writer's host is cut off from the network: the other
takes over; when the network comes back the old writer is fenced and becomes a standby."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon.conftest import DaemonProcess, client
from tests.postgres.daemons import pg_config, role_of, wait_until
from tests.postgres.load import check_acks, stored

LEASE = 2.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    probe = f"nuc-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"`ip netns add` is not permitted here: {detail.decode(errors='replace').strip()}"
    _ip("netns", "del", probe)
    return None


class Hosts:
    """Namespaces `a` and `b`, each joined to the root namespace by a veth pair:
    root 10.213.N.1 <-> namespace 10.213.N.2 (N = 1 for a, 2 for b)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns = {"a": f"nuc-a-{tag}", "b": f"nuc-b-{tag}"}
        self.links = {"a": f"nva{tag}", "b": f"nvb{tag}"}
        self.made: list[str] = []
        for index, name in enumerate("ab", start=1):
            ns, link = self.ns[name], self.links[name]
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("addr", "add", f"10.213.{index}.1/24", "dev", link)
            _ip("link", "set", link, "up")
            _ip("-n", ns, "addr", "add", f"10.213.{index}.2/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def address(self, name: str) -> str:
        return f"10.213.{'ab'.index(name) + 1}.2"

    def server(self, name: str) -> str:
        return f"10.213.{'ab'.index(name) + 1}.1"

    def cut(self, name: str) -> None:
        """Partition the host: its namespace loses its link (nothing reaches it)."""
        _ip("link", "set", self.links[name], "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.links[name], "up")

    def remove(self) -> None:
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    why = _netns_unavailable()
    if why is not None:
        pytest.skip(why)
    made = Hosts()
    try:
        yield made
    finally:
        made.remove()


@pytest.mark.slow
def test_two_hosts_partition_and_fencing(tmp_path: Path, hosts: Hosts) -> None:
    from tests.postgres.cluster import Cluster, unavailable

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    cluster = Cluster(host=f"{hosts.server('a')},{hosts.server('b')}")
    daemons: list[DaemonProcess] = []
    try:
        cluster.start()
        dsn = {name: f"postgresql://postgres@{hosts.server(name)}:{cluster.port}/postgres"
               for name in "ab"}  # fmt: skip
        for name in "ab":
            config = pg_config(tmp_path / f"{name}.toml", dsn[name], "hosts", lease=LEASE)
            daemon = DaemonProcess(
                config,
                "--host",
                hosts.address(name),
                prefix=["ip", "netns", "exec", hosts.ns[name]],
            )
            daemons.append(daemon)
            daemon.wait_listening()
            if name == "a":
                assert role_of(daemon) == "writer"
        a, b = daemons
        wait_until(lambda: role_of(b) == "standby", what="b as a standby")
        acks: list[Any] = []
        from tests.postgres.load import Ack

        def append(daemon: DaemonProcess, n: int) -> httpx.Response:
            rid = uuid.uuid4().hex
            with client(daemon.url) as api:  # type: ignore[arg-type]
                response = api.post(
                    "/v1/ledgers/main/records", json={"kind": "k", "payload": {"id": rid, "n": n}}
                )
            if response.status_code == 201:
                body = response.json()
                acks.append(Ack(rid, body["seq"], body["hash"], time.monotonic(), daemon.url))  # type: ignore[arg-type]
            return response

        for n in range(10):
            assert append(a, n).status_code == 201

        def length(daemon: DaemonProcess) -> int:
            with client(daemon.url) as api:  # type: ignore[arg-type]
                return int(api.get("/v1/ledgers/main/head").json()["length"])

        wait_until(lambda: length(b) == 10, what="b to follow a")
        hosts.cut("a")  # a's host drops off the network: its lease runs out
        wait_until(lambda: role_of(b) == "writer", timeout=LEASE + 30, what="b's takeover")
        for n in range(10, 20):
            assert append(b, n).status_code == 201
        hosts.heal("a")
        wait_until(lambda: role_of(a) == "standby", timeout=60, what="a to become a standby")
        refused = append(a, 99)
        assert refused.status_code == 503
        assert refused.json()["type"].endswith("/not-writer")
        with client(a.url) as api:  # type: ignore[arg-type]
            ready = api.get("/readyz").json()["ledgers"]["main"]
            assert ready["role"] == "standby"
            assert ready["epoch"] == 2
        entries = stored(dsn["a"], "hosts")
        check_acks(acks, entries)
        assert len(entries) == 20
    finally:
        for daemon in daemons:
            daemon.close()
        cluster.remove()
