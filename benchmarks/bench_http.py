"""Appends per second over HTTP (a real `nucleus run` daemon on loopback), single and batch
endpoints, with p50/p99 latency, beside the engine's in-process rate, measured in one run.

Run: python benchmarks/bench_http.py [--repeat 2] [--seconds 4] [--batch 1000]
         [--connections 32] [--batch-connections 4] [--storage memory|sqlite] [--client python|wrk]

Scenarios (round-robin `--repeat` times; the table shows the median of each):
  engine: append, 64 tasks     in process, no HTTP: 64 tasks call `engine.append` (the ceiling
                               for single appends: group commit batches them)
  engine: append_many(B)       in process, no HTTP: batches of B records
  http: POST /records          the load generator keeps `--connections` keep-alive connections
                               busy, one record per request
  http: POST /records/batch    `--batch-connections` connections, B records per request

The load generator runs in another process (this script with `--loadgen`): a minimal
HTTP/1.1 keep-alive client on raw sockets (trio), so that the client costs little next to the
server; every response's status is checked (a non-2xx answer counts as an error and is
reported). `--client wrk` uses wrk (with a Lua script) instead, if it is installed. The daemon
runs the ledger with the chosen storage (`memory` by default: this measures the HTTP layer;
`sqlite` uses durability "normal") and no modules; the in-process scenarios use the same.
Latency is per request (for the batch endpoint: per batch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nucleus_actors import LedgerConfig, Record, open_ledger  # noqa: E402
from nucleus_actors.storage import SQLiteStorage  # noqa: E402

KIND = "order.created"


def payload(n: int) -> dict[str, Any]:
    return {"customer": f"c-{n % 1000}", "total": n % 997, "items": [1, 2, 3]}


# -- in-process ------------------------------------------------------------------------------
def _storage(kind: str, directory: Path) -> SQLiteStorage | None:
    if kind == "memory":
        return None
    path = directory / f"engine-{time.monotonic_ns()}.db"
    return SQLiteStorage(path, durability="normal")


async def engine_single(storage: str, directory: Path, seconds: float) -> dict[str, Any]:
    tasks = 64
    done = 0
    config = LedgerConfig(ledger_id="bench")
    async with open_ledger(config, storage=_storage(storage, directory)) as engine:
        deadline = trio.current_time() + seconds
        start = time.perf_counter()

        async def worker(t: int) -> None:
            nonlocal done
            n = t
            while trio.current_time() < deadline:
                await engine.append(Record(KIND, payload(n)))
                done += 1
                n += tasks

        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(worker, t)
        elapsed = time.perf_counter() - start
    return {"records": done, "elapsed": elapsed}


async def engine_batch(storage: str, directory: Path, seconds: float, batch: int) -> dict[str, Any]:
    done = 0
    config = LedgerConfig(ledger_id="bench")
    async with open_ledger(config, storage=_storage(storage, directory)) as engine:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            records = [Record(KIND, payload(done + i)) for i in range(batch)]
            await engine.append_many(records)
            done += batch
        elapsed = time.perf_counter() - start
    return {"records": done, "elapsed": elapsed}


# -- the daemon ------------------------------------------------------------------------------
class Daemon:
    def __init__(self, storage: str, directory: Path) -> None:
        db = '":memory:"' if storage == "memory" else json.dumps(str(directory / "http.db"))
        config = directory / "bench.toml"
        config.write_text(
            "max_body_bytes = 67108864\n[[ledgers]]\n"
            f'id = "bench"\nstorage = {db}\ndurability = "normal"\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "NUCLEUS_TOKEN"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.log = directory / "daemon.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nucleus_actors", "run", str(config), "--port", "0"],
                stderr=log,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        self.url = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"listening on (http://\S+)", self.log.read_text())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.log.read_text()}")
            time.sleep(0.1)
        raise RuntimeError("the daemon did not listen within 60 s")

    def length(self) -> int:
        import httpx

        return int(httpx.get(f"{self.url}/v1/ledgers/bench/head").json()["length"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# -- the load generator (runs in its own process) -------------------------------------------
def request_bytes(host: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def bodies(batch: int | None, count: int) -> list[bytes]:
    out = []
    for i in range(count):
        if batch is None:
            out.append(json.dumps({"kind": KIND, "payload": payload(i)}).encode())
        else:
            records = [{"kind": KIND, "payload": payload(i * batch + j)} for j in range(batch)]
            out.append(json.dumps({"records": records}).encode())
    return out


async def loadgen(url: str, batch: int | None, connections: int, seconds: float) -> dict[str, Any]:
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    path = "/v1/ledgers/bench/records" + ("" if batch is None else "/batch")
    requests = [request_bytes(host_port, path, body) for body in bodies(batch, 16)]
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = 0.0

    async def connection(c: int) -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        buffer = b""
        n = c
        async with stream:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                await stream.send_all(requests[n % len(requests)])
                n += 1
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise RuntimeError("the daemon closed the connection")
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if match is None:
                    raise RuntimeError(f"no Content-Length in {head[:200]!r}")
                size = int(match.group(1))
                while len(buffer) < size:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise RuntimeError("the daemon closed the connection")
                    buffer += chunk
                body, buffer = buffer[:size], buffer[size:]
                status = int(head.split(b" ", 2)[1])
                latencies.append(time.perf_counter() - start)
                if status != 201:
                    errors.append(f"{status}: {body[:200]!r}")

    start = time.perf_counter()
    stop_at = start + seconds
    async with trio.open_nursery() as nursery:
        for c in range(connections):
            nursery.start_soon(connection, c)
    elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "records": (len(latencies) - len(errors)) * (batch or 1),
        "elapsed": elapsed,
        "latencies": latencies,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def run_loadgen(url: str, batch: int | None, connections: int, seconds: float) -> dict[str, Any]:
    """Run the load generator in a fresh process; return its result."""
    args = [
        sys.executable, __file__, "--loadgen", url, "--connections", str(connections),
        "--seconds", str(seconds),
    ]  # fmt: skip
    if batch is not None:
        args += ["--batch", str(batch)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=seconds + 120)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_wrk(url: str, batch: int | None, connections: int, seconds: float) -> dict[str, Any]:
    """The same load with wrk (Lua script posting pre-built bodies); latency from --latency."""
    path = "/v1/ledgers/bench/records" + ("" if batch is None else "/batch")
    body = bodies(batch, 1)[0].decode()
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body)}\n"
            "function response(status, headers, body)\n"
            '  if status ~= 201 then wrk.thread:set("bad", (wrk.thread:get("bad") or 0) + 1) end\n'
            "end\n"
        )
    threads = min(2, connections)
    duration = f"{max(1, round(seconds))}s"
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", duration, "--latency",
         "-s", script.name, url + path],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout  # fmt: skip
    os.unlink(script.name)

    def unit(text: str) -> float:
        value, suffix = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[suffix]

    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(non2xx.group(1)) if non2xx else 0
    p50 = unit(re.search(r"50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = unit(re.search(r"99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return {
        "requests": requests,
        "records": (requests - errors) * (batch or 1),
        "elapsed": seconds,
        "p50": p50,
        "p99": p99,
        "errors": errors,
        "first_error": None,
    }


# -- the table -------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--batch-connections", type=int, default=4)
    parser.add_argument("--storage", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--client", choices=["python", "wrk"], default="python")
    parser.add_argument("--loadgen", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.loadgen:
        batch = args.batch if "--batch" in sys.argv else None
        result = trio.run(loadgen, args.loadgen, batch, args.connections, args.seconds)
        lat = result.pop("latencies")
        result["p50"], result["p99"] = percentile(lat, 0.50), percentile(lat, 0.99)
        print(json.dumps(result))
        return
    if args.client == "wrk" and shutil.which("wrk") is None:
        sys.exit("--client wrk: wrk is not installed (apt-get install wrk)")

    directory = Path(tempfile.mkdtemp(prefix="bench-http-"))
    http = run_wrk if args.client == "wrk" else run_loadgen
    scenarios = {
        "engine: append, 64 tasks": lambda: trio.run(
            engine_single, args.storage, directory, args.seconds
        ),
        f"engine: append_many({args.batch})": lambda: trio.run(
            engine_batch, args.storage, directory, args.seconds, args.batch
        ),
        f"http: POST /records, {args.connections} conns": lambda: http(
            daemon.url, None, args.connections, args.seconds
        ),
        f"http: POST /records/batch ({args.batch}), {args.batch_connections} conns": lambda: http(
            daemon.url, args.batch, args.batch_connections, args.seconds
        ),
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in scenarios}
    daemon = Daemon(args.storage, directory)
    try:
        for round_ in range(args.repeat):
            for name, scenario in scenarios.items():
                before = daemon.length() if name.startswith("http") else 0
                result = scenario()
                if name.startswith("http"):
                    # Every acknowledged record is stored; wrk may stop with requests in
                    # flight (stored, never acknowledged): at most one per connection.
                    stored = daemon.length() - before
                    unit = 1 if "batch" not in name else args.batch
                    slack = 0 if args.client == "python" else args.connections * unit
                    if not result["records"] <= stored <= result["records"] + slack:
                        sys.exit(f"{name}: the daemon stored {stored}, the client saw "
                                 f"{result['records']} acknowledged")  # fmt: skip
                results[name].append(result)
                rate = result["records"] / result["elapsed"]
                print(f"  round {round_ + 1}: {name}: {rate:,.0f} records/s", file=sys.stderr)
    finally:
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"\nstorage={args.storage}, client={args.client}, {args.seconds:g} s per run, "
        f"median of {args.repeat} rounds, {os.cpu_count()} CPUs shared by daemon and client\n"
    )
    engine_single_rate = statistics.median(
        r["records"] / r["elapsed"] for r in results["engine: append, 64 tasks"]
    )
    engine_batch_rate = statistics.median(
        r["records"] / r["elapsed"] for r in results[f"engine: append_many({args.batch})"]
    )
    header = f"{'scenario':<48} {'records/s':>11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    header += f"{'errors':>6} {'vs engine':>9}"
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        rate = statistics.median(r["records"] / r["elapsed"] for r in runs)
        if name.startswith("http"):
            reqs = statistics.median(r["requests"] / r["elapsed"] for r in runs)
            p50 = statistics.median(r["p50"] for r in runs) * 1e3
            p99 = statistics.median(r["p99"] for r in runs) * 1e3
            errors = sum(r["errors"] for r in runs)
            base = engine_batch_rate if "batch" in name else engine_single_rate
            print(
                f"{name:<48} {rate:>11,.0f} {reqs:>9,.0f} {p50:>8.2f} {p99:>8.2f} "
                f"{errors:>6} {rate / base:>8.0%}"
            )
            first = next((r["first_error"] for r in runs if r["first_error"]), None)
            if first:
                print(f"    first error: {first}")
        else:
            print(f"{name:<48} {rate:>11,.0f} {'':>9} {'':>8} {'':>8} {'':>6} {'':>9}")


if __name__ == "__main__":
    main()
