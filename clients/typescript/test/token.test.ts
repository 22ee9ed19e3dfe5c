// `reads = "token"` against a real daemon: without a token every read is a typed 401, with the
// read token (or the API token) every call works, the SSE tail and events included (fetch-based,
// so the header is sent).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { NucleusApiError, NucleusClient, type Entry } from "@nucleus-actors/client";
import { append, eventually, TestDaemon } from "./daemon.js";

const WRITE = "write-token-0123456789";
const READ = "read-token-9876543210";
const daemon = new TestDaemon(
  `
reads = "token"

[[ledgers]]
id = "main"
storage = ":memory:"

[[ledgers.modules]]
use = "nucleus_fixture_mods:CrashOnCue"
`,
  { NUCLEUS_TOKEN: WRITE, NUCLEUS_READ_TOKEN: READ },
);

before(async () => {
  await daemon.start();
  for (let i = 0; i < 3; i++) await append(daemon.url, "main", "n", { i }, {}, WRITE);
});
after(async () => {
  await daemon.stop();
});

function isUnauthorized(error: unknown): boolean {
  assert.ok(error instanceof NucleusApiError, String(error));
  assert.equal(error.status, 401);
  assert.equal(error.slug, "unauthorized");
  assert.match(error.message, /reads need the header 'Authorization: Bearer <token>'/);
  return true;
}

describe('a daemon with reads = "token"', () => {
  test("without a token (or with a wrong one) every read is a NucleusApiError 401 unauthorized", async () => {
    for (const client of [new NucleusClient({ baseUrl: daemon.url }), new NucleusClient({ baseUrl: daemon.url, token: "wrong" })]) {
      await assert.rejects(client.ledgers(), isUnauthorized);
      await assert.rejects(client.head("main"), isUnauthorized);
      await assert.rejects(client.get("main", 0), isUnauthorized);
      await assert.rejects(client.statistics("main"), isUnauthorized);
      await assert.rejects(client.verifyRange("main"), isUnauthorized);
      // The streams end at once on a 401 (a token does not appear by retrying), with the error.
      await assert.rejects(
        (async () => {
          for await (const _ of client.tail("main", { from: 0, retryMs: 50 })) assert.fail("no entry without a token");
        })(),
        isUnauthorized,
      );
      await assert.rejects(
        (async () => {
          for await (const _ of client.events("main", { retryMs: 50 })) assert.fail("no event without a token");
        })(),
        isUnauthorized,
      );
      // /openapi.json stays open, so the features are known without a token.
      assert.equal((await client.features()).events, true);
    }
  });

  for (const [who, token] of [["the read token", READ], ["the API token", WRITE]] as const) {
    test(`with ${who} every call works, the SSE tail and events included`, async () => {
      const client = new NucleusClient({ baseUrl: daemon.url, token, pageSize: 2 });
      assert.deepEqual((await client.ledgers()).map((l) => l.id), ["main"]);
      const head = await client.head("main");
      assert.equal((await client.get("main", 0)).kind, "n");
      const read: number[] = [];
      for await (const entry of client.read("main")) read.push(entry.seq);
      assert.deepEqual(read, Array.from({ length: head.length }, (_, i) => i));
      assert.deepEqual((await client.modules("main")).map((m) => m.id), ["crasher"]);
      assert.equal((await client.statistics("main")).length, head.length);
      const verified = await client.verifyRange("main");
      assert.deepEqual(verified.ok && [verified.anchor, verified.head], ["head", head.head]);

      const controller = new AbortController();
      const tailed: Entry[] = [];
      const tailing = (async () => {
        for await (const entry of client.tail("main", { from: head.length - 1, signal: controller.signal, reconnect: false })) {
          tailed.push(entry);
          if (tailed.length === 2) controller.abort();
        }
      })();
      const receipt = await append(daemon.url, "main", "tailed", { who }, {}, WRITE);
      await tailing;
      assert.deepEqual(tailed.map((e) => e.seq), [head.length - 1, receipt.seq]);
      assert.deepEqual(tailed[1]?.payload, { who });

      const before = (await client.statistics("main")).last_event;
      const events = new AbortController();
      const seen: string[] = [];
      const following = (async () => {
        for await (const event of client.events("main", { after: before, signal: events.signal, reconnect: false })) {
          seen.push(`${event.module}:${event.type}`);
          if (event.type === "restart") events.abort();
        }
      })();
      await append(daemon.url, "main", "crash", null, {}, WRITE);
      await following;
      assert.ok(seen.includes("crasher:crash"), seen.join(","));
      await eventually(async () => ((await client.modules("main"))[0]?.state === "running" ? true : undefined));
    });
  }

  test("the read token does not write (the client has no append; HTTP refuses it)", async () => {
    assert.equal("append" in NucleusClient.prototype, false);
    await assert.rejects(append(daemon.url, "main", "n", {}, {}, READ), /append failed: 401/);
  });
});
