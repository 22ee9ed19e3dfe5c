// Verification agrees with docs/hashing.md's vectors, with the outside RFC 8785 and RFC 6962
// vectors (../shared/vectors, skipped with a reason when absent) and with Python on new data.
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { ed25519 } from "@noble/curves/ed25519.js";
import { sha256 } from "@noble/hashes/sha2.js";
import {
  canonicalBytes,
  canonicalJson,
  chainHash,
  fromHex,
  genesis,
  leafHash,
  merkleRoot,
  parseVerifierKey,
  ProofError,
  SHA256,
  toHex,
  verifyConsistency,
  verifyEntries,
  verifyCheckpoint,
  verifyInclusion,
  type CommittedRecord,
} from "@nucleus-actors/client";
import { REPO_ROOT, TestDaemon } from "../test/daemon.js";

interface Vector {
  ledger_id: string;
  record: CommittedRecord;
  canonical_hex: string;
  leaf: string;
  chain: string;
}

function hashingVectors(): Vector[] {
  const text = readFileSync(join(REPO_ROOT, "docs", "hashing.md"), "utf8");
  const block = text.split("<!-- vectors:begin -->")[1]?.split("<!-- vectors:end -->")[0] ?? "";
  const json = block.replace(/^\s*```json\s*/, "").replace(/```\s*$/, "");
  return JSON.parse(json) as Vector[];
}

// "../shared/vectors" beside the project (a worktree sits one level deeper), or $NUCLEUS_VECTORS.
const shared = [
  process.env.NUCLEUS_VECTORS,
  join(REPO_ROOT, "..", "shared", "vectors"),
  join(REPO_ROOT, "..", "..", "shared", "vectors"),
].find((p): p is string => p !== undefined && existsSync(p));

describe("docs/hashing.md vectors", () => {
  const vectors = hashingVectors();
  test("there are six", () => assert.equal(vectors.length, 6));

  test("canonical bytes, leaf and chain of every vector", () => {
    const prev: Record<string, Uint8Array> = {};
    for (const v of vectors) {
      const bytes = canonicalBytes(v.record);
      assert.equal(toHex(bytes), v.canonical_hex, `canonical bytes of ${v.ledger_id}/${v.record.seq}`);
      const leaf = leafHash(bytes);
      assert.equal(toHex(leaf), v.leaf);
      const before = prev[v.ledger_id] ?? genesis(v.ledger_id);
      const chain = chainHash(before, v.record.seq, leaf);
      assert.equal(toHex(chain), v.chain);
      prev[v.ledger_id] = chain;
    }
  });

  test("the genesis hashes and the Merkle root the document states", () => {
    assert.equal(toHex(genesis("orders")), "d2853c5f6742e648e1294f92c64d38a9746ed423c00c73b9ff9881020a153e98");
    assert.equal(toHex(genesis("audit")), "24fe36b622f4832e52b3dabe3f222846ff64efbad7854ff89fea5770df9245b5");
    const leaves = vectors.filter((v) => v.ledger_id === "orders").map((v) => fromHex(v.leaf));
    assert.equal(toHex(merkleRoot(leaves)), "52ef600d245ded6085bd8a90140f34e20d136fa4b53dcd79614ac5b163bb8b22");
  });

  test("verifyEntries accepts the orders run and names the seq of a tampered entry", () => {
    const orders = vectors
      .filter((v) => v.ledger_id === "orders")
      .map((v) => ({ ...v.record, timestamp: v.record.ts, hash: v.chain }));
    const ok = verifyEntries("orders", orders);
    assert.deepEqual(ok, { ok: true, head: orders[4]?.hash, checked: 5 });
    const tampered = orders.map((e) => (e.seq === 2 ? { ...e, payload: { text: "changed" } } : e));
    const broken = verifyEntries("orders", tampered);
    assert.equal(broken.ok, false);
    assert.equal(broken.ok === false && broken.seq, 2);
    assert.match(broken.ok === false ? broken.reason : "", /entry 2/);
    // The same entries under another ledger id break at once: the genesis binds the id.
    const other = verifyEntries("audit", orders);
    assert.equal(other.ok === false && other.seq, 0);
  });
});

describe("outside RFC 8785 vectors", { skip: shared ? false : "../shared/vectors is absent" }, () => {
  const root = join(shared ?? "", "rfc8785");
  for (const name of shared ? readdirSync(join(root, "input")) : []) {
    test(name, () => {
      const input: unknown = JSON.parse(readFileSync(join(root, "input", name), "utf8"));
      const expected = readFileSync(join(root, "outhex", name.replace(/\.json$/, ".txt")), "utf8").replace(/\s+/g, "");
      assert.equal(toHex(new TextEncoder().encode(canonicalJson(input))), expected.toLowerCase());
    });
  }
});

function b64(text: string | null | undefined): Uint8Array {
  return Uint8Array.from(atob(text ?? ""), (c) => c.charCodeAt(0));
}

function walk(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((d) =>
    d.isDirectory() ? walk(join(dir, d.name)) : d.name.endsWith(".json") ? [join(dir, d.name)] : [],
  );
}

describe("outside RFC 6962 proof vectors (SHA-256)", { skip: shared ? false : "../shared/vectors is absent" }, () => {
  test("inclusion: every case accepted or rejected as it says", () => {
    const files = walk(join(shared ?? "", "rfc6962", "inclusion"));
    assert.ok(files.length > 20);
    for (const file of files) {
      const c = JSON.parse(readFileSync(file, "utf8")) as { leafIdx: number; treeSize: number; root: string | null; leafHash: string | null; proof: string[] | null; wantErr: boolean };
      let error: unknown;
      try {
        verifyInclusion(b64(c.leafHash), c.leafIdx, c.treeSize, (c.proof ?? []).map(b64), b64(c.root), SHA256);
      } catch (e) {
        error = e;
      }
      assert.equal(error !== undefined, c.wantErr, `${file}: ${String(error)}`);
    }
  });

  test("consistency: every case accepted or rejected as it says", () => {
    const files = walk(join(shared ?? "", "rfc6962", "consistency"));
    assert.ok(files.length > 20);
    for (const file of files) {
      const c = JSON.parse(readFileSync(file, "utf8")) as { size1: number; size2: number; root1: string | null; root2: string | null; proof: string[] | null; wantErr: boolean };
      let error: unknown;
      try {
        verifyConsistency(c.size1, c.size2, (c.proof ?? []).map(b64), b64(c.root1), b64(c.root2), SHA256);
      } catch (e) {
        error = e;
      }
      assert.equal(error !== undefined, c.wantErr, `${file}: ${String(error)}`);
    }
  });
});

describe("agreement with the Python implementation", () => {
  test("canonical bytes and hashes of awkward records match nucleus_actors.hashing", async () => {
    const records: CommittedRecord[] = [
      { kind: "k", meta: { "\u00e9": "1", b: "2", "\ud83d\ude00": "3", "\u20ac": "4" }, payload: [0.1, 1e-7, 1e21, 123456789012345, -0, 5e-324, 1.7976931348623157e308], seq: 0, ts: 1 },
      { kind: "k.2", meta: {}, payload: { "": null, "\u0000": "\u001f\u007f\u2028", nested: [[{}], { z: [true, false] }] }, seq: 1, ts: 2 },
      { kind: "x", meta: {}, payload: "caf\u00e9 \u2603 \ud83d\ude00 \\ \"", seq: 2, ts: 1700000000000000 },
      { kind: "n", meta: {}, payload: [9007199254740991, -9007199254740991, 0.000001, 1e-6, 100.5, 2 ** 52 + 0.5], seq: 3, ts: 1700000000000001 },
    ];
    const viaRfc = await TestDaemon.python(
      `
import json, sys
from nucleus_actors import Record
from nucleus_actors.hashing import canonical_bytes, chain_hash, genesis, leaf_hash
prev = genesis("agree")
out = []
for r in json.loads(sys.argv[1]):
    record = Record(r["kind"], r["payload"], r["meta"], seq=r["seq"], timestamp=r["ts"])
    data = canonical_bytes(record)
    leaf = leaf_hash(data)
    prev = chain_hash(prev, r["seq"], leaf)
    out.append([data.hex(), leaf.hex(), prev.hex()])
print(json.dumps(out))
`,
      JSON.stringify(records),
    );
    const expected = JSON.parse(viaRfc) as [string, string, string][];
    let prev = genesis("agree");
    records.forEach((record, i) => {
      const bytes = canonicalBytes(record);
      const [hex, leaf, chain] = expected[i] as [string, string, string];
      assert.equal(toHex(bytes), hex, `record ${i}`);
      assert.equal(toHex(leafHash(bytes)), leaf);
      prev = chainHash(prev, record.seq, leafHash(bytes));
      assert.equal(toHex(prev), chain);
    });
  });
});

describe("signed checkpoints (C2SP signed note, Ed25519)", () => {
  // A note signed here the way C2SP signed-note specifies: key id = SHA-256(name || 0x0A ||
  // 0x01 || public key)[:4], signature line "— name base64(key id || signature)".
  const name = "nucleus.example/main";
  const secret = ed25519.utils.randomSecretKey();
  const publicKey = ed25519.getPublicKey(secret);
  const keyBytes = Uint8Array.of(1, ...publicKey);
  const keyId = sha256(new Uint8Array([...new TextEncoder().encode(name), 0x0a, ...keyBytes])).slice(0, 4);
  const vkey = `${name}+${toHex(keyId)}+${btoa(String.fromCharCode(...keyBytes))}`;
  const root = merkleRoot([leafHash(Uint8Array.of(1)), leafHash(Uint8Array.of(2))]);
  const sign = (body: string): string => {
    const signature = ed25519.sign(new TextEncoder().encode(body), secret);
    return `${body}\n\u2014 ${name} ${btoa(String.fromCharCode(...keyId, ...signature))}\n`;
  };
  const body = `${name}\n2\n${btoa(String.fromCharCode(...root))}\n`;

  test("a note signed by the key verifies and yields origin, size and root", () => {
    assert.deepEqual(verifyCheckpoint(sign(body), vkey), { origin: name, size: 2, root: toHex(root), chain: null, extensions: [] });
  });

  test("the chain line is parsed; a malformed one, another origin or a short root is refused", () => {
    const chain = "ab".repeat(32);
    const withChain = verifyCheckpoint(sign(`${body}chain ${chain.toUpperCase()}\n`), vkey);
    assert.deepEqual([withChain.chain, withChain.extensions], [chain, [`chain ${chain.toUpperCase()}`]]);
    assert.throws(() => verifyCheckpoint(sign(`${body}chain abc\n`), vkey), /checkpoint chain line must be 64 hex digits: "chain abc"/);
    const elsewhere = `other.example/log\n2\n${btoa(String.fromCharCode(...root))}\n`;
    assert.throws(() => verifyCheckpoint(sign(elsewhere), vkey), /checkpoint origin is "other.example\/log", expected "nucleus.example\/main"/);
    assert.equal(verifyCheckpoint(sign(elsewhere), vkey, { origin: "other.example/log" }).origin, "other.example/log");
    assert.throws(() => verifyCheckpoint(sign(`${name}\n2\n${btoa("short")}\n`), vkey), /root hash is 5 bytes, not 32/);
  });

  test("a changed body, another key or a malformed key is refused", () => {
    const note = sign(body);
    assert.throws(() => verifyCheckpoint(note.replace("\n2\n", "\n3\n"), vkey), ProofError);
    const other = ed25519.getPublicKey(ed25519.utils.randomSecretKey());
    const otherBytes = Uint8Array.of(1, ...other);
    const otherId = sha256(new Uint8Array([...new TextEncoder().encode(name), 0x0a, ...otherBytes])).slice(0, 4);
    assert.throws(() => verifyCheckpoint(note, `${name}+${toHex(otherId)}+${btoa(String.fromCharCode(...otherBytes))}`), /no valid signature/);
    assert.throws(() => parseVerifierKey(`${name}+00000000+${btoa(String.fromCharCode(...keyBytes))}`), /hash does not match/);
  });
});
