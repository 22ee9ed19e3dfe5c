"""kill -9 of a daemon with durable modules, 20 rounds (issue 16's crash test).

The daemon (`nucleus run`, a real process) serves one SQLite ledger with three durable modules
(`tests/daemon/crashmods.py` and the built-in `kind-counter` with a `state` file). Each round:

1. start the daemon and wait until every module has caught up (lag 0: nothing is appended
   meanwhile), then check what the modules wrote:
   * `exactly` (`resume_after`): its file holds every seq of the ledger exactly once, in order,
     and so every acknowledged seq;
   * `atleast` (runtime cursor): every seq at least once; this run's rows are one run of seqs
     with no gap, starting at most one past the previous runs' last seq, so the duplicates are
     only its first rows, right after the crash; their number is within DESIGN's bound,
     "deliveries of one `cursor_interval` + its inbox + one batch";
   * `kind-counter`: its counts equal the ledger's, per kind;
2. append from 8 concurrent clients (threads) and `kill -9` the daemon after a random number of
   acknowledged appends (0 included: right after the checks).

The ledger uses `durability = "normal"` (no fsync per commit): an acknowledged append survives
a process crash either way, and the test is about the process. Real clock, real processes:
about 40 s on an idle 2-core machine (mostly daemon start-ups), marked slow.
"""

from __future__ import annotations

import itertools
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.daemon.conftest import DaemonProcess, toml_str

ROUNDS = 20
CLIENTS = 8
INBOX = 16
CURSOR_INTERVAL = 0.2
SNAPSHOT_EVERY = 50
KINDS = ("a", "b", "c")


def write_config(tmp: Path) -> Path:
    config = tmp / "nucleus.toml"
    config.write_text(
        f"""port = 0
[[ledgers]]
id = "crash"
storage = {toml_str(tmp / "ledger.db")}
durability = "normal"
cursor_interval = {CURSOR_INTERVAL}
[[ledgers.modules]]
use = "tests.daemon.crashmods:Exactly"
inbox = {INBOX}
config = {{ path = {toml_str(tmp / "exactly.db")} }}
[[ledgers.modules]]
use = "tests.daemon.crashmods:AtLeast"
durable = true
inbox = {INBOX}
config = {{ path = {toml_str(tmp / "atleast.db")} }}
[[ledgers.modules]]
use = "kind-counter"
inbox = {INBOX}
config = {{ state = {toml_str(tmp / "counts.db")}, snapshot_every = {SNAPSHOT_EVERY} }}
"""
    )
    return config


def caught_up(url: str) -> tuple[int, dict[str, Any]]:
    """Wait until every module runs with lag 0; return the length and the counter's info."""
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=10) as api:
        while True:
            length = api.get("/v1/ledgers/crash/head").json()["length"]
            modules = {m["id"]: m for m in api.get("/v1/ledgers/crash/modules").json()["modules"]}
            if all(m["state"] == "running" and m["lag"] == 0 for m in modules.values()) and all(
                m["cursor"] == length - 1 for m in modules.values() if length
            ):
                kinds = Counter(
                    entry["kind"]
                    for start in range(0, length, 1000)
                    for entry in api.get(
                        "/v1/ledgers/crash/records", params={"start": start, "limit": 1000}
                    ).json()["entries"]
                )
                return length, {"info": modules["kind-counter"]["info"], "kinds": kinds}
            assert time.monotonic() < deadline, modules
            time.sleep(0.05)


def append_then_kill(url: str, daemon: DaemonProcess, after: int, seed: int) -> set[int]:
    """Append from CLIENTS threads; SIGKILL the daemon once `after` appends were acknowledged.
    Returns the acknowledged seqs."""
    acknowledged: set[int] = set()
    lock = threading.Lock()
    if after == 0:
        daemon.proc.send_signal(signal.SIGKILL)
        return acknowledged

    def client(n: int) -> None:
        rng = random.Random(seed + n)
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=10) as api:
            for i in itertools.count():
                body = {"kind": rng.choice(KINDS), "payload": {"c": n, "i": i}}
                try:
                    response = api.post("/v1/ledgers/crash/records", json=body)
                except httpx.TransportError:
                    return  # the daemon is gone
                if response.status_code != 201 or time.monotonic() > deadline:
                    return
                with lock:
                    acknowledged.add(response.json()["seq"])
                    if len(acknowledged) >= after and daemon.proc.poll() is None:
                        daemon.proc.send_signal(signal.SIGKILL)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return acknowledged


def exactly_seqs(tmp: Path) -> list[int]:
    with sqlite3.connect(tmp / "exactly.db") as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM seen ORDER BY rowid")]


def atleast_rows(tmp: Path) -> list[tuple[int, int, float]]:
    with sqlite3.connect(tmp / "atleast.db") as db:
        return list(db.execute("SELECT seq, pid, t FROM seen ORDER BY rowid"))


def busiest_interval(times: list[float], width: float) -> int:
    """The most deliveries that fall within any window of `width` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] > width:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.slow
def test_kill_9_rounds_with_durable_modules(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acknowledged: set[int] = set()
    previous_pid: int | None = None
    total_duplicates = 0
    for round_ in range(ROUNDS + 1):
        daemon = DaemonProcess(config)
        try:
            url = daemon.wait_listening()
            length, counter = caught_up(url)
            where = f"seed {seed}, round {round_}"
            assert acknowledged <= set(range(length)), where
            # resume_after: every seq exactly once, in order.
            assert exactly_seqs(tmp_path) == list(range(length)), where
            # The runtime cursor: at least once; duplicates only right after the crash.
            rows = atleast_rows(tmp_path)
            assert {seq for seq, _, _ in rows} == set(range(length)), where
            pid = daemon.proc.pid
            mine = [seq for seq, p, _ in rows if p == pid]
            before = [seq for seq, p, _ in rows if p != pid]
            if length:
                first = mine[0] if mine else length
                assert mine == list(range(first, length)), f"{where}: a gap or a reorder"
                resumed_after = max(before, default=-1)
                assert first <= resumed_after + 1, f"{where}: skipped ahead"
                duplicates = resumed_after + 1 - first
                if previous_pid is not None:
                    times = [t for _, p, t in rows if p == previous_pid]
                    # DESIGN: deliveries of one cursor_interval + the inbox + one batch (a
                    # batch here holds at most one append per client).
                    bound = busiest_interval(times, CURSOR_INTERVAL) + INBOX + CLIENTS
                    assert duplicates <= bound, f"{where}: {duplicates} > {bound}"
                total_duplicates += duplicates
            # kind-counter: the ledger's counts, exactly.
            info = counter["info"]
            assert info["total"] == length, where
            assert info["kinds"] == dict(counter["kinds"]), where
            if round_ == ROUNDS:
                break
            after = rng.choice([0, rng.randint(1, 40), rng.randint(40, 200)])
            acknowledged |= append_then_kill(url, daemon, after, rng.randrange(2**32))
            assert daemon.wait() == -signal.SIGKILL, where
            previous_pid = pid
        finally:
            daemon.close()
    assert len(acknowledged) > ROUNDS, f"seed {seed}: too few appends to mean anything"
    print(f"seed {seed}: {len(acknowledged)} acknowledged, {total_duplicates} redeliveries")
