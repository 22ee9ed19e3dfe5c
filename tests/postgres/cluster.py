"""A PostgreSQL cluster a test owns: `initdb` + `pg_ctl` (run as the `postgres` user when the
tests run as root), listening on a given address, removed afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

BIN = Path(os.environ.get("NUCLEUS_PG_BIN", "/usr/lib/postgresql/15/bin"))
PASSWORD_ROLE = "pwuser"
PASSWORD = "right-password"


def unavailable() -> str | None:
    """Why a test cannot own a cluster here, or None."""
    if not (BIN / "initdb").exists() or not (BIN / "pg_ctl").exists():
        return f"initdb/pg_ctl not found in {BIN} (set NUCLEUS_PG_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start PostgreSQL as the postgres user"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Cluster:
    """`initdb` a new cluster in a temporary directory; `start`, `restart`, `stop`, `remove`.

    Connections from the host address are trusted, except role `pwuser` (password
    `right-password`, SCRAM), which `start` creates for password tests.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, netns: str | None = None):
        self.host = host
        self.port = port or free_port(host.split(",")[0] if netns is None else "127.0.0.1")
        self.netns = netns
        self.dir = Path(tempfile.mkdtemp(prefix="nucleus-pg-"))
        self.data = self.dir / "data"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all {PASSWORD_ROLE} 0.0.0.0/0 scram-sha-256\n"
            "host all all 0.0.0.0/0 trust\n"
        )

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        if self.netns is not None:  # as root: `ip netns exec` runs runuser inside the namespace
            command = ["ip", "netns", "exec", self.netns, *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout, text=True)

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses={self.host} -k {self.dir}"
        self._run(
            str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
            "-o", options, "-w", "-t", "60", *extra, action,
        )  # fmt: skip

    def start(self) -> None:
        self._pg_ctl("start")
        self._run(
            str(BIN / "psql"),
            "-h", str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-c", f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'",
        )  # fmt: skip

    def restart(self) -> None:
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop", "-m", "immediate")

    def log(self) -> str:
        try:
            return (self.dir / "log").read_text()
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
