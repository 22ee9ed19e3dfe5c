"""Memory and latency under concurrent maximum-size batches (issue 15, section 5).

Starts `nucleus run` (one ledger, storage as chosen, default limits), then for `--seconds`
keeps `--clients` connections each posting a maximum-size batch (a body just under
`max_body_bytes`, `--records` records: `max_batch_records`) back to back, from a separate
process, while a prober GETs `/healthz` every 20 ms on its own connection. Reports the
daemon's peak RSS (VmHWM) and RSS before, the batch count and statuses, and `/healthz` latency
p50 / p99 / max.

Run: python benchmarks/bench_amplification.py [--clients 8] [--seconds 10] [--records 1000]
         [--storage sqlite|memory]
(memory storage keeps every appended byte in the daemon's RSS: use sqlite, the default, for the
RSS target.)
Targets (issue 15): peak RSS < 400 MB, /healthz p99 < 100 ms with 8 clients.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def body(records: int, size: int) -> bytes:
    """A batch of `records` records whose JSON is just under `size` bytes."""

    def make(text: str) -> bytes:
        items = [{"kind": "bench.item", "payload": {"t": text, "n": n}} for n in range(records)]
        return json.dumps({"records": items}).encode()

    pad = max(0, (size - len(make("")) - 64) // records)
    data = make("x" * pad)
    assert len(data) <= size, len(data)
    return data


def rss(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def post(url: str, clients: int, seconds: float, records: int) -> dict[int, int]:
    """`clients` threads posting maximum-size batches back to back for `seconds`."""
    payload = body(records, 4 << 20)
    stop = time.monotonic() + seconds
    statuses: collections.Counter[int] = collections.Counter()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as api:
            while time.monotonic() < stop:
                response = api.post(
                    "/v1/ledgers/main/records/batch",
                    content=payload,
                    headers={"Content-Type": "application/json"},
                )
                statuses[response.status_code] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(statuses)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--records", type=int, default=1000, help="max_batch_records (default)")
    parser.add_argument("--storage", choices=["memory", "sqlite"], default="sqlite")
    parser.add_argument(
        "--loop-stats",
        action="store_true",
        help="also time every event-loop step inside the daemon (thread CPU time: how long a "
        "step held the loop, independent of the machine's other load)",
    )
    parser.add_argument("--poster", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poster:
        print(json.dumps(post(args.poster, args.clients, args.seconds, args.records)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        storage = '":memory:"' if args.storage == "memory" else '"bench.db"\ndurability = "normal"'
        config = Path(tmp) / "nucleus.toml"
        config.write_text(f'[[ledgers]]\nid = "main"\nstorage = {storage}\n')
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NUCLEUS_TOKEN", None)
        stats = Path(tmp) / "loop.json"
        launcher = (
            [str(REPO / "benchmarks" / "_loop_stats.py"), str(stats)]
            if args.loop_stats
            else ["-m", "nucleus_actors"]
        )
        proc = subprocess.Popen(
            [sys.executable, *launcher, "run", str(config), "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url = match.group(1)
                break
        assert url is not None, "daemon did not start"
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
        payload_size = len(body(args.records, 4 << 20))
        rss_before = rss(proc.pid, "VmRSS")
        # The posting clients run in their own process: in this one, their threads would hold
        # the GIL while the prober waits, and its latencies would be the client's, not the
        # daemon's.
        posters = subprocess.Popen(
            [sys.executable, __file__, "--poster", url, "--clients", str(args.clients),
             "--seconds", str(args.seconds), "--records", str(args.records)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        latencies: list[float] = []
        with httpx.Client(base_url=url, timeout=120) as api:
            assert api.get("/healthz").status_code == 200
            time.sleep(0.5)  # the posters connect and start sending
            window = [time.monotonic(), 0.0]
            while posters.poll() is None:
                start = time.perf_counter()
                assert api.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
        window[1] = time.monotonic()
        out, _ = posters.communicate()
        statuses = json.loads(out)
        peak = rss(proc.pid, "VmHWM")
        proc.terminate()
        proc.wait(60)
        loop = None
        if args.loop_stats:
            sys.path.insert(0, str(REPO / "benchmarks"))
            from _loop_stats import summary

            loop = summary(str(stats), window[0], window[1])
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"clients {args.clients}, {args.records} records/batch, body {payload_size} bytes, "
        f"{args.seconds:g} s, storage {args.storage}, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(f"batches by status: {dict(statuses)}")
    print(f"daemon RSS before {rss_before / 2**20:.0f} MB, peak {peak / 2**20:.0f} MB")
    print(
        f"/healthz: {len(latencies)} probes, p50 {statistics.median(latencies) * 1e3:.1f} ms, "
        f"p99 {p99 * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms"
    )
    if loop is not None:
        print(loop)


if __name__ == "__main__":
    main()
