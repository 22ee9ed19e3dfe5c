"""A `nucleus tail --follow` client must not hold a stopping daemon for its graceful_timeout.

The daemon ends every stream at once with an `event: shutdown`; the client waits before
retrying and keeps no idle keep-alive connection that the daemon would wait on. The daemon's
graceful_timeout here is longer than the test's bound on the daemon's exit: had the client held
it, the daemon would not exit in time (no timed assertion: a bound on a wait).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from .conftest import EXIT_TIMEOUT, DaemonProcess
from .test_tooling import Tail

CONFIG = """
graceful_timeout = 600
[[ledgers]]
id = "main"
storage = ":memory:"
"""


def test_sigterm_with_a_following_tail_does_not_wait_the_graceful_timeout(
    tmp_path: Path,
) -> None:
    config = tmp_path / "nucleus.toml"
    config.write_text(CONFIG)
    daemon = DaemonProcess(config)
    tail: Tail | None = None
    try:
        url = daemon.wait_listening()
        httpx.post(f"{url}/v1/ledgers/main/records", json={"kind": "k", "payload": 1})
        tail = Tail("--url", url, "--from", "0")
        deadline = time.monotonic() + 60
        while not tail.out and time.monotonic() < deadline:  # following: entry 0 printed
            time.sleep(0.05)
        assert tail.seqs() == [0], tail.err
        assert daemon.stop() == 0  # bounded by EXIT_TIMEOUT, far below graceful_timeout
        assert EXIT_TIMEOUT < 600
        deadline = time.monotonic() + 30
        while not tail.err and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "the daemon is shutting down" in tail.err[0], tail.err
        assert "HTTP server stopped" in daemon.log
    finally:
        if tail is not None:
            tail.close()
        daemon.close()
