"""Ingestion over HTTP: the single-record POST against a bare ASGI app on the same server, and
the NDJSON streaming append against the same work done in-process, measured in one run.

Run: python benchmarks/bench_ingest.py [--rounds 3] [--seconds 5] [--connections 64]
         [--stream-records 20000] [--only post|stream]

Scenarios (interleaved: every round runs each of them once; the table shows best and median):

  bare: hypercorn-trio ASGI     a bare ASGI app (reads the body, `json.loads` it, answers a 201
                                JSON receipt) on `hypercorn.trio.serve`, the daemon's own server:
                                the ceiling of the HTTP stack
  daemon: POST /records         `nucleus run` with the `nucleus init` template (SQLite,
                                durability "full", two modules: RequireFields, KindCounter),
                                one small record per request
  in-process: append_each       parse NDJSON lines, build Records, `engine.append_each` in groups,
                                encode the receipt lines; SQLite durability "full", no modules
  daemon: POST /records/stream  the same records as one NDJSON stream on one connection, to a
                                daemon with the same ledger settings (no modules); receipts are
                                read while the body is still being sent (full duplex)

Both POST scenarios are driven by `wrk -t1 -c64` (Debian's `wrk` package) with a Lua script; every
non-2xx answer is counted and reported. The stream client is a raw-socket chunked upload (a
sender task and a reader task on one connection) that checks every receipt line.
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
import textwrap
import time
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KIND = "order.created"
RECORD = {"kind": KIND, "payload": {"customer": "c-17", "total": 42, "items": [1, 2, 3]}}

BARE_APP = """
import json, sys, trio
from functools import partial
from hypercorn.config import Config
from hypercorn.trio import serve

RECEIPT = json.dumps({"seq": 0, "hash": "0" * 64, "timestamp": 0}).encode()

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    json.loads(body)
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(RECEIPT)).encode())]})
    await send({"type": "http.response.body", "body": RECEIPT})

async def main():
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve, app, config))
        print("listening on " + urls[0], file=sys.stderr, flush=True)

trio.run(main)
"""


# -- processes -------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUCLEUS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Server:
    """A server subprocess that logs `listening on URL` on stderr."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                args, stderr=out, stdout=subprocess.DEVNULL, env=_env(), cwd=log.parent
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"listening on (https?://\S+)", log.read_text())
            if match:
                self.url = match.group(1)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args}: exited:\n{log.read_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"{args}: did not listen within 60 s")

    def cpu(self) -> float:
        """CPU seconds (user + system) the server process used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def length(self, ledger: str) -> int:
        import httpx

        return int(httpx.get(f"{self.url}/v1/ledgers/{ledger}/head").json()["length"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def daemon(
    directory: Path, name: str, *, modules: bool, extra: str = "", access_log: bool = False
) -> Server:
    from nucleus_actors.daemon.template import CONFIG_TEMPLATE

    sub = directory / name
    sub.mkdir()
    text = CONFIG_TEMPLATE if modules else CONFIG_TEMPLATE.split("[[ledgers.modules]]")[0]
    text = text.replace("max_body_bytes = 4194304", "max_body_bytes = 4194304\n" + extra)
    (sub / "nucleus.toml").write_text(text)
    args = [sys.executable, "-m", "nucleus_actors", "run", "nucleus.toml", "--port", "0"]
    quiet = [] if access_log else ["--no-access-log"] * _has_access_flag()
    return Server(args + quiet, sub / "daemon.log")


def _has_access_flag() -> int:
    """1 when `nucleus run` knows --no-access-log (the access log is not part of what the
    benchmark compares: the bare app logs nothing either)."""
    out = subprocess.run(
        [sys.executable, "-m", "nucleus_actors", "run", "--help"],
        capture_output=True, text=True, env=_env(), check=False,
    ).stdout  # fmt: skip
    return 1 if "--no-access-log" in out else 0


# -- wrk -------------------------------------------------------------------------------------
def run_wrk(server: Server, path: str, connections: int, seconds: float) -> dict[str, Any]:
    """Requests/s posting one record per request, with wrk (`-t1`), the non-2xx count and the
    server's CPU time per request (less sensitive than rates to other load on the machine)."""
    url = server.url + path
    cpu = server.cpu()
    body = json.dumps(RECORD)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body)}\n"
        )
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
             "-s", script.name, url],
            capture_output=True, text=True, check=True, timeout=seconds + 60,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script.name)
    cpu = server.cpu() - cpu
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    return {
        "rate": rate,
        "requests": requests,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "p99": p99.group(1) if p99 else "?",
        "cpu_us": cpu / max(1, requests) * 1e6,
    }


# -- streaming -------------------------------------------------------------------------------
def ndjson(count: int) -> list[bytes]:
    """`count` NDJSON lines of ~100-byte records."""
    return [
        json.dumps(
            {"kind": KIND, "payload": {"customer": f"c-{i % 1000}", "total": i, "n": "x" * 24}},
            separators=(",", ":"),
        ).encode()
        + b"\n"
        for i in range(count)
    ]


async def in_process(directory: Path, lines: list[bytes], group: int) -> dict[str, Any]:
    """The stream endpoint's work without HTTP: parse, build records, append_each, encode."""
    from nucleus_actors import LedgerConfig, Record, open_ledger
    from nucleus_actors.storage import SQLiteStorage

    path = directory / f"inproc-{time.monotonic_ns()}.db"
    out = 0
    async with open_ledger(
        LedgerConfig(ledger_id="main"), storage=SQLiteStorage(path, durability="full")
    ) as engine:
        start = time.perf_counter()
        for first in range(0, len(lines), group):
            chunk = lines[first : first + group]
            records = []
            for line in chunk:
                value = json.loads(line)
                records.append(Record(value["kind"], value["payload"], value.get("meta") or {}))
            outcomes = await engine.append_each(records)
            for n, receipt in enumerate(outcomes, start=first + 1):
                text = json.dumps(
                    {"line": n, "seq": receipt.seq, "hash": receipt.hash.hex(),  # type: ignore[union-attr]
                     "timestamp": receipt.timestamp},  # type: ignore[union-attr]
                    separators=(",", ":"),
                )  # fmt: skip
                out += len(text)
        elapsed = time.perf_counter() - start
    path.unlink()
    return {"rate": len(lines) / elapsed, "records": len(lines)}


async def stream_client(url: str, ledger: str, lines: list[bytes]) -> dict[str, Any]:
    """Upload `lines` as one chunked NDJSON body while reading the receipt lines."""
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    head = (
        f"POST /v1/ledgers/{ledger}/records/stream HTTP/1.1\r\nHost: {host_port}\r\n"
        "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    receipts = 0
    errors: list[bytes] = []
    summary: dict[str, Any] = {}
    start = time.perf_counter()

    async def send() -> None:
        await stream.send_all(head)
        for first in range(0, len(lines), 64):
            chunk = b"".join(lines[first : first + 64])
            await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await stream.send_all(b"0\r\n\r\n")

    async def receive() -> None:
        nonlocal receipts, summary
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        status_line, _, buffer = buffer.partition(b"\r\n\r\n")
        if b" 200 " not in status_line.split(b"\r\n")[0]:
            raise RuntimeError(f"stream answered {status_line[:200]!r}")
        # the body is chunked; receipt lines are found by their newlines (chunk-size lines
        # are hex and never start with '{')
        text = buffer
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                break
            text += data
            *complete, text = text.split(b"\n")
            for line in complete:
                line = line.strip(b"\r")
                if line.startswith(b'{"line"'):
                    if b'"seq"' in line:
                        receipts += 1
                    else:
                        errors.append(line)
                elif line.startswith(b'{"summary"'):
                    summary = json.loads(line)["summary"]

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    elapsed = time.perf_counter() - start
    if receipts != len(lines) or errors:
        raise RuntimeError(f"{receipts} receipts for {len(lines)} lines; errors {errors[:3]}")
    return {"rate": len(lines) / elapsed, "records": receipts, "summary": summary}


# -- the application layer alone (no server, no sockets) -------------------------------------
async def app_cpu(which: str, requests: int) -> float:
    """CPU microseconds per request of an ASGI application called directly by 64 tasks: the
    bare app, or the daemon's whole stack (access layer, FastAPI, guards, fast path, engine with
    the template's two modules, memory storage). Robust to other load on the machine."""
    from nucleus_actors import LedgerConfig, ModuleSpec, open_ledger
    from nucleus_actors.daemon import DaemonState, LedgerHost, create_app, parse_config
    from nucleus_actors.daemon.access import AccessLog
    from nucleus_actors.daemon.modules import KindCounter, RequireFields

    namespace: dict[str, Any] = {}
    exec(BARE_APP.split("async def main")[0], namespace)
    body = json.dumps(RECORD).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/ledgers/main/records", "query_string": b"",
        "raw_path": b"/v1/ledgers/main/records", "root_path": "", "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8470),
        "headers": [(b"host", b"127.0.0.1:8470"), (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body))],
    }  # fmt: skip
    statuses: list[int] = []

    async def one(app: Any) -> None:
        given = False

        async def receive() -> dict[str, Any]:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await trio.sleep_forever()
            raise AssertionError  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)

    async def drive(app: Any, count: int) -> None:
        async def worker() -> None:
            for _ in range(count // 64):
                await one(app)

        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(worker)

    settings = parse_config(
        {"ledgers": [{"id": "main", "storage": ":memory:"}]}, base_dir=Path(".")
    ).ledgers[0]
    modules = [
        ModuleSpec(RequireFields(), config={"kinds": ["order."], "fields": ["customer"]}),
        ModuleSpec(KindCounter(), durable=True),
    ]
    async with open_ledger(LedgerConfig(ledger_id="main"), modules=modules) as engine:
        host = LedgerHost(settings, engine, None)
        host.serving = True
        state = DaemonState({"main": host}, token=None, max_body_bytes=1 << 22)
        app = {
            "bare": namespace["app"],
            "daemon": AccessLog(create_app(state), enabled=False),
            "daemon, access log": AccessLog(create_app(state), enabled=True),
        }[which]
        await drive(app, 640)
        start = time.process_time()
        await drive(app, requests)
        spent = time.process_time() - start
    if set(statuses) != {201}:
        raise RuntimeError(f"statuses {set(statuses)}")
    return spent / requests * 1e6


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--stream-records", type=int, default=20000)
    parser.add_argument(
        "--group", type=int, default=1024, help="records per append_each (as the stream route)"
    )
    parser.add_argument("--only", choices=["post", "stream", "app"])
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="also run the single POST against a daemon with its access log on (the default "
        "configuration; the bare app logs nothing)",
    )
    args = parser.parse_args()
    if args.only == "app":
        import logging

        logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
        for _ in range(args.rounds):
            for which in ("bare", "daemon", "daemon, access log"):
                cost = trio.run(app_cpu, which, 12800)
                print(f"application layer alone, {which}: {cost:.0f} us CPU per request")
        return
    if args.only != "stream" and shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")

    directory = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    servers: dict[str, Server] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        if args.only != "stream":
            servers["bare"] = Server(
                [sys.executable, "-c", textwrap.dedent(BARE_APP)], directory / "bare.log"
            )
            servers["post"] = daemon(directory, "post", modules=True)
            if args.access_log:
                servers["logged"] = daemon(directory, "logged", modules=True, access_log=True)
        if args.only != "post":
            servers["stream"] = daemon(directory, "stream", modules=False)
        lines = ndjson(args.stream_records)
        scenarios: dict[str, Any] = {}
        if args.only != "stream":
            scenarios["bare: hypercorn-trio ASGI"] = lambda: run_wrk(
                servers["bare"], "/", args.connections, args.seconds
            )
            scenarios["daemon: POST /records"] = lambda: run_wrk(
                servers["post"], "/v1/ledgers/main/records", args.connections, args.seconds
            )
            if args.access_log:
                scenarios["daemon: POST /records, access log"] = lambda: run_wrk(
                    servers["logged"], "/v1/ledgers/main/records", args.connections, args.seconds
                )
        if args.only != "post":
            scenarios["in-process: append_each"] = lambda: trio.run(
                in_process, directory, lines, args.group
            )
            scenarios["daemon: POST /records/stream"] = lambda: trio.run(
                stream_client, servers["stream"].url, "main", lines
            )
        results = {name: [] for name in scenarios}
        for round_ in range(args.rounds):
            for name, scenario in scenarios.items():
                checked = name.endswith("/records")
                before = servers["post"].length("main") if checked else 0
                result = scenario()
                if checked:
                    stored = servers["post"].length("main") - before
                    ok = result["requests"] - result["non2xx"]
                    # wrk may stop with requests in flight: stored, never acknowledged
                    if not ok <= stored <= ok + args.connections:
                        sys.exit(f"{name}: stored {stored}, acknowledged {ok}")
                results[name].append(result)
                extra = f" (non-2xx {result['non2xx']})" if result.get("non2xx") else ""
                if "cpu_us" in result:
                    extra += f", server CPU {result['cpu_us']:.0f} us/request"
                print(
                    f"  round {round_ + 1}: {name}: {result['rate']:,.0f}/s{extra}",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"\n{args.rounds} interleaved rounds, {args.seconds:g} s per wrk run "
        f"(-t1 -c{args.connections}), {args.stream_records} stream records, "
        f"{os.cpu_count()} CPUs shared by servers and clients\n"
    )
    header = f"{'scenario':<34} {'best/s':>10} {'median/s':>10} {'non-2xx':>8}"
    print(header)
    print("-" * len(header))
    best: dict[str, float] = {}
    for name, runs in results.items():
        rates = [r["rate"] for r in runs]
        best[name] = max(rates)
        bad = sum(r.get("non2xx", 0) for r in runs)
        print(f"{name:<34} {max(rates):>10,.0f} {statistics.median(rates):>10,.0f} {bad:>8}")
    print()
    if "daemon: POST /records" in best:
        ratio = best["daemon: POST /records"] / best["bare: hypercorn-trio ASGI"]
        print(f"single POST / bare ASGI (best rounds): {ratio:.2f}x (target >= 0.80x)")
        if "daemon: POST /records, access log" in best:
            logged = best["daemon: POST /records, access log"] / best["bare: hypercorn-trio ASGI"]
            print(f"  with the access log on: {logged:.2f}x")
        bare_cpu = min(r["cpu_us"] for r in results["bare: hypercorn-trio ASGI"])
        ours_cpu = min(r["cpu_us"] for r in results["daemon: POST /records"])
        print(
            f"server CPU per request (lowest round): bare {bare_cpu:.0f} us, daemon "
            f"{ours_cpu:.0f} us (bare / daemon = {bare_cpu / ours_cpu:.2f}x)"
        )
    if "daemon: POST /records/stream" in best:
        ratio = best["daemon: POST /records/stream"] / best["in-process: append_each"]
        print(
            f"stream / in-process (best rounds): {ratio:.2f}x (target >= 0.70x); stream rate "
            f"{best['daemon: POST /records/stream']:,.0f} records/s on one connection"
        )
    # Side by side: each target with what it is measured against, from the same run.
    pairs = [
        ("single POST (req/s)", "daemon: POST /records", "bare: hypercorn-trio ASGI", 0.8),
        (
            "single POST, access log (req/s)",
            "daemon: POST /records, access log",
            "bare: hypercorn-trio ASGI",
            0.8,
        ),
        (
            "NDJSON stream (records/s)",
            "daemon: POST /records/stream",
            "in-process: append_each",
            0.7,
        ),
    ]
    rows = [(label, ours, base, goal) for label, ours, base, goal in pairs if ours in best]
    if rows:
        print()
        head = f"{'target':<33} {'ours':>9} {'baseline':>9} {'ratio':>7} {'goal':>7}  verdict"
        print(head)
        print("-" * len(head))
        for label, ours, base, goal in rows:
            value = best[ours] / best[base]
            verdict = "ok" if value >= goal else "MISSED"
            print(
                f"{label:<33} {best[ours]:>9,.0f} {best[base]:>9,.0f} {value:>6.2f}x "
                f"{f'>={goal:.1f}x':>7}  {verdict}"
            )
        print("(baseline: the bare ASGI app for POSTs, the same work in process for the stream)")
    load = os.getloadavg()
    print(
        f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
        f"{os.cpu_count()} CPUs (above the CPU count, the machine was shared: ratios are noisy)"
    )


if __name__ == "__main__":
    main()
