// A tour of @nucleus-actors/client: every call, then verification. Run against a daemon:
//   NUCLEUS_URL=http://127.0.0.1:8470 node examples/tour.mjs
// (NUCLEUS_READ_TOKEN for a daemon with reads = "token", NUCLEUS_VKEY to check its checkpoints)
// (The client test suite runs it against the daemon it starts.)
import { NucleusApiError, NucleusClient, verifyEntries } from "@nucleus-actors/client";

const client = new NucleusClient({ baseUrl: process.env.NUCLEUS_URL ?? "http://127.0.0.1:8470", token: process.env.NUCLEUS_READ_TOKEN });

const ledgers = await client.ledgers(); // [{ id, length, phase }, ...]
const id = ledgers[0].id;
const head = await client.head(id); // { ledger, length, head, phase }
console.log(`ledger ${id}: ${head.length} entries, head ${head.head}`);

if (head.length > 0) {
  const first = await client.get(id, 0); // { seq, kind, payload, meta, timestamp, hash }
  console.log(`entry 0: ${first.kind} ${JSON.stringify(first.payload)}`);
}

// A half-open range, fetched page by page as you iterate.
const entries = [];
for await (const entry of client.read(id, { from: 0, to: Math.min(head.length, 50) })) entries.push(entry);
console.log(`read ${entries.length} entries`);

// The same entries checked here, without trusting the daemon's hashes.
const checked = verifyEntries(id, entries);
console.log(checked.ok ? `chain ok up to ${checked.head}` : `chain breaks at seq ${checked.seq}: ${checked.reason}`);

for (const module of await client.modules(id)) {
  console.log(`module ${module.id}: ${module.state}, incarnation ${module.incarnation}, ${module.crashes} crashes`);
}
const stats = await client.statistics(id);
console.log(`statistics: ${stats.appends} appends, ${stats.crashes} crashes, ${stats.restarts} restarts`);
console.log(`features: ${JSON.stringify(await client.features())}`);
console.log(`checkpoint: ${(await client.checkpoint(id)) ?? "not served"}`);

// Follow new entries for two seconds (resumes by itself if the connection drops).
const stop = AbortSignal.timeout(2000);
for await (const entry of client.tail(id, { signal: stop })) console.log(`new entry ${entry.seq}: ${entry.kind}`);

// Lifecycle events kept by the daemon (crashes, restarts, state changes), then live ones.
const quiet = AbortSignal.timeout(500);
for await (const event of client.events(id, { signal: quiet })) {
  console.log(`event ${event.id}: ${event.module} ${event.type} -> ${event.state}`);
}

// With the daemon's verifier key (NUCLEUS_VKEY, printed by `nucleus keygen`): the signed
// checkpoint, an entry proved to be in it, and the range verified against it.
const vkey = process.env.NUCLEUS_VKEY;
if (vkey && head.length > 0) {
  const signed = await client.verifiedCheckpoint(id, { vkey }); // { origin, size, root, chain }
  console.log(signed ? `signed checkpoint: ${signed.size} entries by ${signed.origin}, chain ${signed.chain}` : "no signed checkpoint");
  if (signed && signed.size > 0) {
    const { entry } = await client.proveInclusion(id, signed.size - 1, { vkey });
    console.log(`entry ${entry.seq} is in the signed tree`);
  }
}

const result = await client.verifyRange(id, { vkey }); // { ok: true, head } or { ok: false, seq, reason }
console.log(result.ok ? `verified ${result.checked} entries against the ${result.anchor}` : `seq ${result.seq} does not verify: ${result.reason}`);

try {
  await client.get(id, head.length + 1000);
} catch (error) {
  if (!(error instanceof NucleusApiError)) throw error;
  console.log(`${error.status} ${error.slug}`); // 404 unknown-seq
}
