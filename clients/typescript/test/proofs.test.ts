// Checkpoints and proofs against a real daemon that signs (a `checkpoint_key` made with
// `nucleus keygen`): the client verifies the signed note, the chain line, inclusion and
// consistency proofs and `verifyRange` against the checkpoint, agrees with Python on all of it,
// and refuses a tampered signature, a wrong key and a tampered proof, saying what failed.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  canonicalBytes,
  leafHash,
  merkleRoot,
  NucleusClient,
  ProofError,
  recordOf,
  toHex,
  verifyCheckpoint,
  verifyConsistency,
  verifyInclusion,
  type Entry,
} from "@nucleus-actors/client";
import { append, keygen, PACKAGE_ROOT, TestDaemon } from "./daemon.js";

const ORIGIN = "test.example/signed";
const daemon = new TestDaemon(`
[[ledgers]]
id = "signed"
storage = "signed.db"
checkpoint_key = "signed.key"
checkpoint_origin = "${ORIGIN}"

[[ledgers]]
id = "plain"
storage = ":memory:"
`);
let vkey: string;
let client: NucleusClient;
/** The first checkpoint's note (13 entries), kept for the consistency test. */
let firstNote: string;

before(async () => {
  vkey = await keygen(ORIGIN, join(daemon.dir, "signed.key"));
  await daemon.start();
  client = new NucleusClient({ baseUrl: daemon.url, vkey, pageSize: 5 });
  for (let i = 0; i < 13; i++) await append(daemon.url, "signed", "order", { i, note: "caf\u00e9" });
});
after(async () => {
  await daemon.stop();
});

async function entries(id: string): Promise<Entry[]> {
  const out: Entry[] = [];
  for await (const entry of client.read(id)) out.push(entry);
  return out;
}

const leafOf = (entry: Entry): Uint8Array => leafHash(canonicalBytes(recordOf(entry)));

/** Change one hex digit of a hash (a proof hash an attacker altered). */
const flip = (hex: string): string => (hex[0] === "0" ? "1" : "0") + hex.slice(1);

/** A `fetch` that hands every JSON response whose URL matches `pattern` to `edit` first. */
function lyingFetch(pattern: RegExp, edit: (body: Record<string, unknown>) => void): typeof fetch {
  return async (input, init) => {
    const response = await fetch(input, init);
    if (!pattern.test(String(input))) return response;
    const body = (await response.json()) as Record<string, unknown>;
    edit(body);
    return new Response(JSON.stringify(body), { status: response.status, headers: response.headers });
  };
}

/** `fetch` answering the checkpoint route with `note` (a daemon that signs what it wants). */
function checkpointFetch(note: string): typeof fetch {
  return async (input, init) =>
    /\/checkpoint$/.test(String(input)) ? new Response(note, { headers: { "Content-Type": "text/plain" } }) : fetch(input, init);
}

describe("checkpoints and proofs from a daemon with a checkpoint key", () => {
  test("the signed checkpoint verifies; size, root and chain line match the entries and Python", async () => {
    assert.deepEqual(await client.features(), { checkpoint: true, proofs: true, statistics: true, events: true });
    const note = await client.checkpoint("signed");
    assert.ok(note !== null);
    firstNote = note;
    const checkpoint = verifyCheckpoint(note, vkey);
    const all = await entries("signed");
    const head = await client.head("signed");
    assert.equal(checkpoint.origin, ORIGIN);
    assert.equal(checkpoint.size, 13);
    assert.equal(checkpoint.root, toHex(merkleRoot(all.map(leafOf))));
    assert.equal(checkpoint.chain, head.head, "the chain line is the chain head at that size");
    assert.deepEqual(checkpoint.extensions, [`chain ${head.head}`]);
    assert.deepEqual(await client.verifiedCheckpoint("signed"), checkpoint);
    // Python's verifier reads the same note the same way.
    const python = await TestDaemon.python(
      `
import json, sys
from nucleus_actors.checkpoint import Checkpoint, VerifierKey
print(json.dumps(Checkpoint.verify(sys.argv[1], VerifierKey.parse(sys.argv[2])).to_json()))
`,
      note,
      vkey,
    );
    const { extensions: _, ...fields } = checkpoint;
    assert.deepEqual(JSON.parse(python), fields);
    // A ledger without a key serves no checkpoint: null, not an error.
    assert.equal(await client.checkpoint("plain"), null);
    assert.equal(await client.verifiedCheckpoint("plain"), null);
  });

  test("every inclusion proof and every consistency proof verifies against the signed root", async () => {
    const checkpoint = verifyCheckpoint(firstNote, vkey);
    const leaves = (await entries("signed")).slice(0, 13).map(leafOf);
    for (let seq = 0; seq < 13; seq++) {
      const proof = await client.inclusionProof("signed", seq, 13);
      assert.equal(proof.leaf, toHex(leaves[seq] as Uint8Array), `leaf of entry ${seq}`);
      assert.equal(proof.root, checkpoint.root);
      verifyInclusion(leaves[seq] as Uint8Array, seq, 13, proof.path, checkpoint.root);
    }
    for (let size = 1; size <= 13; size++) {
      const proof = await client.consistencyProof("signed", size, 13);
      assert.equal(proof.old_root, toHex(merkleRoot(leaves.slice(0, size))));
      verifyConsistency(size, 13, proof.path, merkleRoot(leaves.slice(0, size)), checkpoint.root);
    }
    const proved = await client.proveInclusion("signed", 5);
    assert.equal(proved.entry.seq, 5);
    assert.deepEqual(proved.entry.payload, { i: 5, note: "caf\u00e9" });
    assert.equal(proved.checkpoint.size, 13);
  });

  test("proveConsistency: the ledger only grew since an older checkpoint", async () => {
    for (let i = 13; i < 19; i++) await append(daemon.url, "signed", "order", { i });
    const { older, newer } = await client.proveConsistency("signed", firstNote);
    assert.deepEqual([older.size, newer.size], [13, 19]);
    assert.equal(newer.chain, (await client.head("signed")).head);
    // The same note twice: nothing in between to prove, and nothing wrong.
    const now = await client.checkpoint("signed");
    assert.ok(now !== null);
    assert.equal((await client.proveConsistency("signed", now)).newer.size, 19);
  });

  test("verifyRange anchors the whole ledger, a prefix and a slice to the checkpoint", async () => {
    const whole = await client.verifyRange("signed");
    assert.deepEqual(whole.ok && [whole.anchor, whole.to, whole.checked], ["checkpoint", 19, 19], JSON.stringify(whole));
    const prefix = await client.verifyRange("signed", { to: 7 }); // consistency proof 7 -> 19
    assert.deepEqual(prefix.ok && [prefix.anchor, prefix.to], ["checkpoint", 7], JSON.stringify(prefix));
    const slice = await client.verifyRange("signed", { from: 4, to: 11 }); // inclusion of entry 10
    assert.deepEqual(slice.ok && [slice.anchor, slice.from, slice.to], ["checkpoint", 4, 11], JSON.stringify(slice));
    const tail = await client.verifyRange("signed", { from: 3 }); // the chain line too
    assert.equal(tail.ok && tail.anchor, "checkpoint", JSON.stringify(tail));
    // Without a key the checkpoint is not consulted: the head is the anchor.
    const unkeyed = new NucleusClient({ baseUrl: daemon.url });
    const plain = await unkeyed.verifyRange("signed");
    assert.equal(plain.ok && plain.anchor, "head");
    // An empty ledger with a key: nothing to tie to a checkpoint.
    const empty = await client.head("plain");
    assert.deepEqual(await client.verifyRange("plain"), { ok: true, head: empty.head, from: 0, to: 0, checked: 0, anchor: "head" });
  });

  test("examples/tour.mjs with NUCLEUS_VKEY proves an entry and verifies against the checkpoint", async () => {
    const result = spawnSync(process.execPath, [join(PACKAGE_ROOT, "examples", "tour.mjs")], {
      env: { ...process.env, NUCLEUS_URL: daemon.url, NUCLEUS_VKEY: vkey },
      encoding: "utf8",
      timeout: 30_000,
    });
    assert.equal(result.status, 0, result.stderr);
    const head = await client.head("signed");
    assert.match(result.stdout, new RegExp(`^signed checkpoint: ${head.length} entries by test\\.example/signed, chain ${head.head}$`, "m"));
    assert.match(result.stdout, new RegExp(`^entry ${head.length - 1} is in the signed tree$`, "m"));
    assert.match(result.stdout, /^verified \d+ entries against the checkpoint$/m);
  });

  test("a tampered signature, a changed note and a wrong key are refused by name", async () => {
    const note = (await client.checkpoint("signed")) ?? "";
    const [body, signatures] = note.split("\n\n") as [string, string];
    const [dash, name, signature] = signatures.trim().split(" ") as [string, string, string];
    // One byte of the Ed25519 signature changed (the key id, the first 4 bytes, kept).
    const raw = Uint8Array.from(atob(signature), (c) => c.charCodeAt(0));
    raw[10] = (raw[10] ?? 0) ^ 1;
    const forged = `${body}\n\n${dash} ${name} ${btoa(String.fromCharCode(...raw))}\n`;
    assert.throws(() => verifyCheckpoint(forged, vkey), { name: "ProofError", message: `no valid signature by ${ORIGIN} on the checkpoint` });
    // The body changed (a bigger size), the signature kept.
    assert.throws(() => verifyCheckpoint(note.replace("\n19\n", "\n20\n"), vkey), /no valid signature by test\.example\/signed/);
    // Another key with the same name, and a key of another name.
    const other = await keygen(ORIGIN, join(daemon.dir, "other.key"));
    assert.throws(() => verifyCheckpoint(note, other), /no valid signature by test\.example\/signed/);
    const stranger = await keygen("other.example/log", join(daemon.dir, "stranger.key"));
    assert.throws(() => verifyCheckpoint(note, stranger), /no valid signature by other\.example\/log/);
    // The client refuses the same way wherever it checks a checkpoint.
    const wrong = new NucleusClient({ baseUrl: daemon.url, vkey: other });
    await assert.rejects(wrong.verifyRange("signed"), (e: unknown) => e instanceof ProofError && /no valid signature/.test(e.message));
    await assert.rejects(wrong.proveInclusion("signed", 1), ProofError);
    await assert.rejects(client.proveConsistency("signed", forged), /no valid signature/);
    const lying = new NucleusClient({ baseUrl: daemon.url, vkey, fetch: checkpointFetch(forged) });
    await assert.rejects(lying.verifiedCheckpoint("signed"), /no valid signature by test\.example\/signed/);
  });

  test("a tampered proof hash or entry is refused, naming the entry or root", async () => {
    const size = (await client.head("signed")).length;
    const leaves = (await entries("signed")).map(leafOf);
    const checkpoint = verifyCheckpoint((await client.checkpoint("signed")) ?? "", vkey);
    const inclusion = await client.inclusionProof("signed", 5, size);
    const badPath = [flip(inclusion.path[0] as string), ...inclusion.path.slice(1)];
    assert.throws(() => verifyInclusion(leaves[5] as Uint8Array, 5, size, badPath, checkpoint.root), {
      name: "ProofError",
      message: `entry 5 is not in the tree of size ${size} with that root`,
    });
    assert.throws(() => verifyInclusion(leaves[5] as Uint8Array, 5, size, inclusion.path.slice(1), checkpoint.root), /shorter than the tree is deep/);
    const consistency = await client.consistencyProof("signed", 7, size);
    const badConsistency = [flip(consistency.path[0] as string), ...consistency.path.slice(1)];
    assert.throws(() => verifyConsistency(7, size, badConsistency, merkleRoot(leaves.slice(0, 7)), checkpoint.root), /does not lead to the (old|new) root/);

    // A daemon that lies in its proofs: verifyRange names the entry the proof was about.
    const badInclusion = new NucleusClient({
      baseUrl: daemon.url,
      vkey,
      fetch: lyingFetch(/\/proof\/inclusion/, (body) => void (body.path = (body.path as string[]).map(flip))),
    });
    const slice = await badInclusion.verifyRange("signed", { from: 4, to: 11 });
    assert.equal(slice.ok, false);
    assert.equal(!slice.ok && slice.seq, 10);
    assert.match(!slice.ok ? slice.reason : "", new RegExp(`checkpoint of ${size} entries: entry 10 is not in the tree`));
    await assert.rejects(badInclusion.proveInclusion("signed", 3), /entry 3 is not in the tree/);
    const badConsistent = new NucleusClient({
      baseUrl: daemon.url,
      vkey,
      fetch: lyingFetch(/\/proof\/consistency/, (body) => void (body.path = (body.path as string[]).map(flip))),
    });
    const prefix = await badConsistent.verifyRange("signed", { to: 7 });
    assert.equal(!prefix.ok && prefix.seq, 6);
    assert.match(!prefix.ok ? prefix.reason : "", /does not lead to the (old|new) root/);
    await assert.rejects(badConsistent.proveConsistency("signed", firstNote), /does not lead to the (old|new) root/);

    // An entry served with other content than it was signed with.
    const badEntry = new NucleusClient({
      baseUrl: daemon.url,
      vkey,
      fetch: lyingFetch(/\/records\/3$/, (body) => void (body.payload = { i: 3, note: "changed" })),
    });
    await assert.rejects(badEntry.proveInclusion("signed", 3), /entry 3: its content hashes to leaf [0-9a-f]{64}, the proof is for/);
  });

  test("a checkpoint signed by the right key over the wrong chain head is caught by the chain line", async () => {
    // The daemon's own key signs a note whose root is right but whose chain line is not.
    const note = await TestDaemon.python(
      `
import sys
from pathlib import Path
from nucleus_actors.checkpoint import Checkpoint
from nucleus_actors.daemon.checkpoints import load_signer_key
from nucleus_actors.record import Hash
good = Checkpoint.parse(sys.argv[2].split("\\n\\n")[0] + "\\n")
bad = Checkpoint(origin=good.origin, size=good.size, root=good.root, chain=Hash(bytes(32)))
sys.stdout.write(bad.sign(load_signer_key(Path(sys.argv[1]))))
`,
      join(daemon.dir, "signed.key"),
      (await client.checkpoint("signed")) ?? "",
    );
    const size = (await client.head("signed")).length;
    assert.equal(verifyCheckpoint(note, vkey).chain, "0".repeat(64));
    const lying = new NucleusClient({ baseUrl: daemon.url, vkey, fetch: checkpointFetch(note) });
    const result = await lying.verifyRange("signed");
    assert.equal(result.ok, false);
    assert.equal(!result.ok && result.seq, size - 1);
    assert.match(!result.ok ? result.reason : "", new RegExp(`entries up to ${size - 1} chain to [0-9a-f]{64}, the signed checkpoint says 0{64}`));
    // Proofs alone cannot see it (the root is right): the chain line is what binds the chain.
    await lying.proveInclusion("signed", 0);
  });
});
