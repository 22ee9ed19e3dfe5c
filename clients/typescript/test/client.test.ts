// The client against a real daemon (`nucleus run` on a temporary config, started here).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { NucleusApiError, NucleusClient, type Entry } from "@nucleus-actors/client";
import { append, eventually, PACKAGE_ROOT, tamper, TestDaemon } from "./daemon.js";

const daemon = new TestDaemon();
let client: NucleusClient;

before(async () => {
  await daemon.start();
  client = new NucleusClient({ baseUrl: daemon.url, pageSize: 7 });
});
after(async () => {
  await daemon.stop();
});

describe("NucleusClient against a real daemon", () => {
  test("the generated types are up to date with the daemon's OpenAPI document", () => {
    const result = spawnSync(process.execPath, [join(PACKAGE_ROOT, "scripts", "gen-openapi.mjs"), "--check", "--url", `${daemon.url}/openapi.json`], { encoding: "utf8" });
    assert.equal(result.status, 0, result.stderr + result.stdout);
  });

  test("ledgers, head, get, statistics and modules", async () => {
    const first = await append(daemon.url, "main", "order.created", { id: 1, amount: 12.5 }, { trace: "t1" });
    const ledgers = await client.ledgers();
    assert.deepEqual(ledgers.map((l) => l.id), ["main", "aux"]);
    const head = await client.head("main");
    assert.equal(head.length, first.seq + 1);
    assert.equal(head.head, first.hash);
    const entry = await client.get("main", first.seq);
    assert.deepEqual(
      { kind: entry.kind, payload: entry.payload, meta: entry.meta, hash: entry.hash, timestamp: entry.timestamp },
      { kind: "order.created", payload: { id: 1, amount: 12.5 }, meta: { trace: "t1" }, hash: first.hash, timestamp: first.timestamp },
    );
    const stats = await client.statistics("main");
    assert.equal(stats.ledger, "main");
    assert.equal(stats.length, head.length);
    assert.ok(stats.appends >= 1);
    assert.equal(stats.modules.running, 2);
    const modules = await client.modules("main");
    assert.deepEqual(modules.map((m) => [m.id, m.state]), [["crasher", "running"], ["kind-counter", "running"]]);
    await assert.rejects(client.get("main", 10_000), (error: unknown) => {
      assert.ok(error instanceof NucleusApiError);
      assert.equal(error.status, 404);
      assert.equal(error.slug, "unknown-seq");
      return true;
    });
    await assert.rejects(client.head("nope"), (e: unknown) => e instanceof NucleusApiError && e.slug === "unknown-ledger");
  });

  test("read is a half-open async iterator over pages", async () => {
    const base = (await client.head("aux")).length;
    for (let i = 0; i < 20; i++) await append(daemon.url, "aux", "n", { i });
    const seqs = async (range: { from?: number; to?: number }): Promise<number[]> => {
      const out: number[] = [];
      for await (const e of client.read("aux", range)) out.push(e.seq);
      return out;
    };
    assert.deepEqual(await seqs({ from: base + 3, to: base + 18 }), Array.from({ length: 15 }, (_, i) => base + 3 + i));
    assert.deepEqual(await seqs({ from: base + 5, to: base + 5 }), []);
    assert.equal((await seqs({})).length, base + 20);
    assert.deepEqual(await seqs({ from: base + 18, to: base + 100 }), [base + 18, base + 19]);
  });

  test("tail follows new appends and resumes after the last seq", async () => {
    const start = (await client.head("main")).length;
    const controller = new AbortController();
    const seen: Entry[] = [];
    const tailing = (async () => {
      for await (const entry of client.tail("main", { from: start, signal: controller.signal })) {
        seen.push(entry);
        if (seen.length === 3) controller.abort();
      }
    })();
    for (const n of [1, 2, 3]) await append(daemon.url, "main", "tick", { n });
    await tailing;
    assert.deepEqual(seen.map((e) => e.seq), [start, start + 1, start + 2]);
    assert.deepEqual(seen.map((e) => e.payload), [{ n: 1 }, { n: 2 }, { n: 3 }]);
  });

  test("lifecycle events report a crash and the restart", async () => {
    const controller = new AbortController();
    const kept: string[] = [];
    const before = (await client.statistics("main")).last_event;
    const following = (async () => {
      for await (const event of client.events("main", { after: before, signal: controller.signal })) {
        if (event.module === "crasher") kept.push(`${event.type}:${event.state}`);
        if (kept.includes("restart:running") || kept.filter((k) => k.startsWith("state:running")).length > 0) controller.abort();
      }
    })();
    await append(daemon.url, "main", "crash", null);
    await following;
    assert.ok(kept.includes("crash:restarting") || kept.some((k) => k.startsWith("crash")), kept.join(","));
    const stats = await eventually(async () => {
      const s = await client.statistics("main");
      return s.crashes >= 1 && s.restarts >= 1 ? s : undefined;
    });
    assert.ok(stats.last_event > before);
  });

  test("examples/tour.mjs runs and prints what the docs say", async () => {
    await append(daemon.url, "main", "tour", { hello: "world" });
    const result = spawnSync(process.execPath, [join(PACKAGE_ROOT, "examples", "tour.mjs")], {
      env: { ...process.env, NUCLEUS_URL: daemon.url },
      encoding: "utf8",
      timeout: 30_000,
    });
    assert.equal(result.status, 0, result.stderr);
    const out = result.stdout;
    assert.match(out, /^ledger main: \d+ entries, head [0-9a-f]{64}$/m);
    assert.match(out, /^chain ok up to [0-9a-f]{64}$/m);
    assert.match(out, /^module crasher: running, incarnation \d+, \d+ crashes$/m);
    assert.match(out, /^checkpoint: not served$/m);
    assert.match(out, /^event 1: crasher state -> running$/m);
    assert.match(out, /^verified \d+ entries against the head$/m);
    assert.match(out, /^404 unknown-seq$/m);
  });

  test("verifyRange agrees with the daemon, then names a tampered seq", async () => {
    for (let i = 0; i < 5; i++) await append(daemon.url, "main", "v", { i, text: "caf\u00e9 \ud83d\ude00", x: [1.5, -0, 1e21] });
    const whole = await client.verifyRange("main");
    assert.equal(whole.ok, true, JSON.stringify(whole));
    const head = await client.head("main");
    assert.deepEqual(whole.ok && [whole.head, whole.to, whole.anchor], [head.head, head.length, "head"]);
    const slice = await client.verifyRange("main", { from: 2, to: head.length - 1 });
    assert.equal(slice.ok, true);
    // Python's own verifier agrees on the same file (read-only, beside the running daemon).
    const py = spawnSync(process.env.NUCLEUS_PYTHON ?? (process.env.VENV ? join(process.env.VENV, "bin", "python") : "python3"), ["-m", "nucleus_actors", "verify", join(daemon.dir, "main.db")], { encoding: "utf8", env: { ...process.env, PYTHONPATH: [join(PACKAGE_ROOT, "..", ".."), process.env.PYTHONPATH].filter(Boolean).join(":") } });
    assert.equal(py.status, 0, py.stderr);
    assert.ok(py.stdout.includes(head.head), py.stdout);

    // A tail across the daemon's restart resumes after the last seq it yielded.
    const controller = new AbortController();
    const tailed: number[] = [];
    let disconnects = 0;
    const length = head.length;
    const tailing = (async () => {
      const options = { from: length, signal: controller.signal, retryMs: 200, onDisconnect: () => void disconnects++ };
      for await (const entry of client.tail("main", options)) {
        tailed.push(entry.seq);
        if (entry.seq === length + 1) controller.abort();
      }
    })();
    try {
      await append(daemon.url, "main", "before-restart", null);
      await eventually(async () => (tailed.length === 1 ? true : undefined), 10_000, "the first tailed entry");
      await daemon.stop();
      await tamper(join(daemon.dir, "main.db"), 2);
      await daemon.start(daemon.port);
      await append(daemon.url, "main", "after-restart", null);
      await tailing;
      assert.deepEqual(tailed, [length, length + 1]);
    } finally {
      controller.abort(); // a failure above must not leave the tail retrying forever
    }
    assert.ok(disconnects >= 1);
    const broken = await client.verifyRange("main");
    assert.equal(broken.ok, false);
    assert.equal(!broken.ok && broken.seq, 2);
    assert.match(!broken.ok ? broken.reason : "", /entry 2/);
    const later = await client.verifyRange("main", { from: 3 });
    assert.equal(later.ok, true, "a slice after the tampered entry still chains from its stored hash");
  });
});
