/**
 * Client-side verification: canonical bytes (RFC 8785), the blake3 hash chain, RFC 6962 Merkle
 * proofs and signed checkpoints (C2SP signed notes, Ed25519), exactly as docs/hashing.md
 * specifies. Nothing here talks to the network: `NucleusClient.verifyRange` feeds it.
 */
import { ed25519 } from "@noble/curves/ed25519.js";
import { blake3 } from "@noble/hashes/blake3.js";
import { sha256 } from "@noble/hashes/sha2.js";
import canonicalize from "canonicalize";

/** The fields of a committed record that its hash covers (docs/hashing.md `bytes_i`). */
export interface CommittedRecord {
  kind: string;
  meta: Record<string, string>;
  payload: unknown;
  seq: number;
  /** Commit time, UTC microseconds since the Unix epoch (`timestamp` in the HTTP API). */
  ts: number;
}

/** An entry as the HTTP API returns it (`EntryOut`). */
export interface EntryLike {
  seq: number;
  kind: string;
  payload: unknown;
  meta: Record<string, string>;
  timestamp: number;
  hash: string;
}

const encoder = new TextEncoder();

/** Lowercase hex of bytes. */
export function toHex(bytes: Uint8Array): string {
  let out = "";
  for (const byte of bytes) out += byte.toString(16).padStart(2, "0");
  return out;
}

/** Bytes of a hex string (even length, hex digits only). */
export function fromHex(hex: string): Uint8Array {
  if (hex.length % 2 !== 0 || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new TypeError(`not a hex string: ${JSON.stringify(hex.slice(0, 80))}`);
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = Number.parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

function u64be(value: number): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(value));
  return out;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= (a[i] ?? 0) ^ (b[i] ?? 0);
  return diff === 0;
}

/** RFC 8785 (JCS) canonical JSON text of any JSON value. */
export function canonicalJson(value: unknown): string {
  const text = canonicalize(value);
  if (text === undefined) throw new TypeError("value has no JSON representation");
  return text;
}

/** `bytes_i`: the UTF-8 of the canonical JSON of `{kind, meta, payload, seq, ts}`. */
export function canonicalBytes(record: CommittedRecord): Uint8Array {
  const { kind, meta, payload, seq, ts } = record;
  return encoder.encode(canonicalJson({ kind, meta, payload, seq, ts }));
}

/** The committed record an API entry stands for (`timestamp` becomes `ts`). */
export function recordOf(entry: EntryLike): CommittedRecord {
  return {
    kind: entry.kind,
    meta: entry.meta,
    payload: entry.payload,
    seq: entry.seq,
    ts: entry.timestamp,
  };
}

/** `CHAIN_-1 = blake3(0x03 || utf8(ledger_id))`. */
export function genesis(ledgerId: string): Uint8Array {
  return blake3(concat(Uint8Array.of(3), encoder.encode(ledgerId)));
}

/** `LEAF_i = blake3(0x00 || bytes_i)`. */
export function leafHash(canonical: Uint8Array): Uint8Array {
  return blake3(concat(Uint8Array.of(0), canonical));
}

/** `CHAIN_i = blake3(0x02 || CHAIN_i-1 || u64be(i) || LEAF_i)`. */
export function chainHash(prev: Uint8Array, seq: number, leaf: Uint8Array): Uint8Array {
  return blake3(concat(Uint8Array.of(2), prev, u64be(seq), leaf));
}

/** `NODE(l, r) = blake3(0x01 || l || r)`. */
export function nodeHash(left: Uint8Array, right: Uint8Array): Uint8Array {
  return blake3(concat(Uint8Array.of(1), left, right));
}

/** Where a run of entries stopped verifying. */
export interface ChainBreak {
  ok: false;
  /** The first seq that does not verify. */
  seq: number;
  /** What is wrong with it, in words. */
  reason: string;
}

/** A run of entries that verified. */
export interface ChainOk {
  ok: true;
  /** `CHAIN_i` of the last entry checked (hex); the starting hash if there were none. */
  head: string;
  /** Entries checked. */
  checked: number;
}

/**
 * Checks entries one at a time, in order, from a known previous chain hash: recomputes each
 * entry's canonical bytes, leaf and chain hash and compares with the hash the daemon sent.
 */
export class ChainVerifier {
  private prev: Uint8Array;
  private nextSeq: number;
  private lastTs = -Infinity;
  private count = 0;

  /**
   * @param prev `CHAIN_{start-1}` (the genesis for `start = 0`), bytes or hex.
   * @param start the seq of the first entry to come.
   */
  constructor(prev: Uint8Array | string, start = 0) {
    this.prev = typeof prev === "string" ? fromHex(prev) : prev;
    this.nextSeq = start;
  }

  /** The next entry: `null` if it verifies, else why it does not (naming its seq). */
  feed(entry: EntryLike): ChainBreak | null {
    const expected = this.nextSeq;
    if (entry.seq !== expected) {
      return { ok: false, seq: expected, reason: `expected entry ${expected}, got seq ${entry.seq}` };
    }
    if (entry.timestamp < this.lastTs) {
      return {
        ok: false,
        seq: entry.seq,
        reason: `entry ${entry.seq}: timestamp ${entry.timestamp} is before the previous entry's`,
      };
    }
    let canonical: Uint8Array;
    try {
      canonical = canonicalBytes(recordOf(entry));
    } catch (error) {
      return { ok: false, seq: entry.seq, reason: `entry ${entry.seq}: ${String(error)}` };
    }
    const chain = chainHash(this.prev, entry.seq, leafHash(canonical));
    const given = /^[0-9a-f]{64}$/.test(entry.hash) ? fromHex(entry.hash) : null;
    if (given === null || !equal(chain, given)) {
      return {
        ok: false,
        seq: entry.seq,
        reason:
          `entry ${entry.seq}: its content hashes to chain ${toHex(chain)}, ` +
          `the daemon says ${entry.hash} (the entry or an earlier one was altered)`,
      };
    }
    this.prev = chain;
    this.nextSeq += 1;
    this.lastTs = entry.timestamp;
    this.count += 1;
    return null;
  }

  /** The chain hash after the last verified entry, as hex. */
  get head(): string {
    return toHex(this.prev);
  }

  /** Entries verified so far. */
  get checked(): number {
    return this.count;
  }

  /** The seq the next entry must have. */
  get next(): number {
    return this.nextSeq;
  }
}

/** Verify a whole run of entries from `prev` (default: the genesis of `ledgerId`, from seq 0). */
export function verifyEntries(
  ledgerId: string,
  entries: Iterable<EntryLike>,
  options: { prev?: string; start?: number } = {},
): ChainOk | ChainBreak {
  const verifier = new ChainVerifier(options.prev ?? genesis(ledgerId), options.start ?? 0);
  for (const entry of entries) {
    const broken = verifier.feed(entry);
    if (broken) return broken;
  }
  return { ok: true, head: verifier.head, checked: verifier.checked };
}

// -- Merkle trees (RFC 6962 / RFC 9162 shape) ---------------------------------------------------
/** A Merkle hasher: leaf, node and the root of an empty tree. */
export interface Hasher {
  leaf(data: Uint8Array): Uint8Array;
  node(left: Uint8Array, right: Uint8Array): Uint8Array;
  empty(): Uint8Array;
}

/** blake3 with the prefixes of docs/hashing.md (the ledger's own tree). */
export const BLAKE3: Hasher = {
  leaf: leafHash,
  node: nodeHash,
  empty: () => blake3(new Uint8Array(0)),
};

/** SHA-256 as RFC 6962 (for C2SP tlog tooling). */
export const SHA256: Hasher = {
  leaf: (data) => sha256(concat(Uint8Array.of(0), data)),
  node: (l, r) => sha256(concat(Uint8Array.of(1), l, r)),
  empty: () => sha256(new Uint8Array(0)),
};

function largestPowerOfTwoBelow(n: number): number {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
}

/** The root of the tree over `leaves` (already leaf hashes). */
export function merkleRoot(leaves: readonly Uint8Array[], hasher: Hasher = BLAKE3): Uint8Array {
  if (leaves.length === 0) return hasher.empty();
  if (leaves.length === 1) return leaves[0] as Uint8Array;
  const k = largestPowerOfTwoBelow(leaves.length);
  return hasher.node(merkleRoot(leaves.slice(0, k), hasher), merkleRoot(leaves.slice(k), hasher));
}

/** A proof that does not verify. */
export class ProofError extends Error {
  override name = "ProofError";
}

const HASH_BYTES = 32;

function asBytes(h: Uint8Array | string, what = "hash"): Uint8Array {
  const bytes = typeof h === "string" ? fromHex(h) : h;
  if (bytes.length !== HASH_BYTES) throw new ProofError(`${what} is ${bytes.length} bytes, not ${HASH_BYTES}`);
  return bytes;
}

/**
 * Check that `leaf` is entry `index` of the tree of `size` leaves whose root is `root`
 * (RFC 9162 section 2.1.3.2). Throws `ProofError` when it is not.
 */
export function verifyInclusion(
  leaf: Uint8Array | string,
  index: number,
  size: number,
  path: readonly (Uint8Array | string)[],
  root: Uint8Array | string,
  hasher: Hasher = BLAKE3,
): void {
  if (!(index >= 0 && index < size)) throw new ProofError(`index ${index} is not below size ${size}`);
  let fn = index;
  let sn = size - 1;
  let r = asBytes(leaf, "leaf hash");
  const expected = asBytes(root, "root");
  for (const item of path) {
    const p = asBytes(item, "path hash");
    if (sn === 0) throw new ProofError("inclusion path is longer than the tree is deep");
    if (fn % 2 === 1 || fn === sn) {
      r = hasher.node(p, r);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = hasher.node(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new ProofError("inclusion path is shorter than the tree is deep");
  if (!equal(r, expected)) throw new ProofError(`entry ${index} is not in the tree of size ${size} with that root`);
}

/**
 * Check that the tree of `newSize` leaves with `newRoot` extends the tree of `oldSize` leaves
 * with `oldRoot` (RFC 9162 section 2.1.4.2). Throws `ProofError` when it does not.
 */
export function verifyConsistency(
  oldSize: number,
  newSize: number,
  path: readonly (Uint8Array | string)[],
  oldRoot: Uint8Array | string,
  newRoot: Uint8Array | string,
  hasher: Hasher = BLAKE3,
): void {
  // Roots are compared as given (a wrong-length root simply does not match).
  const first = typeof oldRoot === "string" ? fromHex(oldRoot) : oldRoot;
  const second = typeof newRoot === "string" ? fromHex(newRoot) : newRoot;
  if (oldSize > newSize) throw new ProofError(`old size ${oldSize} is beyond new size ${newSize}`);
  if (oldSize === newSize) {
    if (path.length !== 0) throw new ProofError("a proof between equal sizes must be empty");
    if (!equal(first, second)) throw new ProofError("equal sizes with different roots");
    if (oldSize === 0 && !equal(first, hasher.empty())) throw new ProofError("the root of the empty tree is not the empty hash");
    return;
  }
  if (oldSize === 0) throw new ProofError("a consistency proof from the empty tree proves nothing");
  let items = path.map((p) => asBytes(p, "path hash"));
  if (items.length === 0) throw new ProofError("empty consistency path");
  // If old_size is a power of two, the old root is the first node of the path.
  if ((oldSize & (oldSize - 1)) === 0) items = [first, ...items];
  let fn = oldSize - 1;
  let sn = newSize - 1;
  while (fn % 2 === 1) {
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  let fr = items[0] as Uint8Array;
  let sr = items[0] as Uint8Array;
  for (const c of items.slice(1)) {
    if (sn === 0) throw new ProofError("consistency path is too long");
    if (fn % 2 === 1 || fn === sn) {
      fr = hasher.node(c, fr);
      sr = hasher.node(c, sr);
      if (fn % 2 === 0) {
        while (fn % 2 === 0 && fn !== 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      sr = hasher.node(sr, c);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new ProofError("consistency path is too short");
  if (!equal(fr, first)) throw new ProofError(`the proof does not lead to the old root (size ${oldSize})`);
  if (!equal(sr, second)) throw new ProofError(`the proof does not lead to the new root (size ${newSize})`);
}

// -- signed checkpoints (C2SP signed-note + tlog-checkpoint) ------------------------------------
/** A checkpoint's body: origin line, tree size, root hash, chain head. */
export interface Checkpoint {
  origin: string;
  size: number;
  /** Root hash of the Merkle tree of `size` entries, as lowercase hex. */
  root: string;
  /**
   * `CHAIN_{size-1}` from the `chain <hex>` extension line (the genesis hash when `size` is
   * 0), as lowercase hex; `null` for a checkpoint without that line.
   */
  chain: string | null;
  /** Lines after the third (extensions, the chain line included), without their newlines. */
  extensions: string[];
}

function b64decode(text: string): Uint8Array {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text)) throw new ProofError(`not base64: ${text.slice(0, 40)}`);
  const binary = atob(text);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

/** Parse a vkey `name+hash+base64(0x01 || ed25519 public key)` (C2SP signed-note). */
export function parseVerifierKey(vkey: string): { name: string; keyId: Uint8Array; publicKey: Uint8Array } {
  // The key is base64, which may itself contain "+": split at the first two only.
  const match = /^([^+\s]+)\+([^+]*)\+(\S+)$/.exec(vkey.trim());
  if (!match) throw new ProofError("a verifier key is name+hash+key");
  const [, name, hash, key] = match as unknown as [string, string, string, string];
  const raw = b64decode(key);
  if (raw.length !== 33 || raw[0] !== 1) throw new ProofError("only Ed25519 verifier keys (type 0x01) are supported");
  const keyId = sha256(concat(encoder.encode(name), Uint8Array.of(0x0a), raw)).slice(0, 4);
  if (!/^[0-9a-f]{8}$/.test(hash) || toHex(keyId) !== hash) throw new ProofError("verifier key hash does not match its name and key");
  return { name, keyId, publicKey: raw.slice(1) };
}

/**
 * Verify a signed note (the daemon's `GET .../checkpoint`) with a verifier key and return the
 * checkpoint it carries. Throws `ProofError`, saying what failed, when no signature by that key
 * verifies, when the origin line is not `origin` (default: the key's name, as the daemon signs),
 * or when the text is not a tlog-checkpoint (size, 32-byte root, `chain` line of 64 hex digits).
 */
export function verifyCheckpoint(note: string, vkey: string, options: { origin?: string } = {}): Checkpoint {
  const split = note.lastIndexOf("\n\n");
  if (split < 0 || !note.endsWith("\n")) throw new ProofError("a signed note is text, a blank line and signatures");
  const body = note.slice(0, split + 1);
  const key = parseVerifierKey(vkey);
  const message = encoder.encode(body);
  let verified = false;
  for (const line of note.slice(split + 2).split("\n")) {
    if (line === "") continue;
    const match = /^\u2014 (\S+) (\S+)$/.exec(line);
    if (!match) throw new ProofError(`malformed signature line: ${line.slice(0, 60)}`);
    if (match[1] !== key.name) continue;
    const raw = b64decode(match[2] as string);
    if (raw.length !== 68 || !equal(raw.slice(0, 4), key.keyId)) continue;
    if (ed25519.verify(raw.slice(4), message, key.publicKey)) verified = true;
  }
  if (!verified) throw new ProofError(`no valid signature by ${key.name} on the checkpoint`);
  const lines = body.slice(0, -1).split("\n");
  if (lines.length < 3 || lines.some((line) => line === "")) {
    throw new ProofError("a checkpoint is at least three non-empty lines (origin, size, root)");
  }
  const [origin, sizeText, rootText] = lines as [string, string, string];
  const expected = options.origin ?? key.name;
  if (origin !== expected) throw new ProofError(`checkpoint origin is ${JSON.stringify(origin)}, expected ${JSON.stringify(expected)}`);
  if (!/^(0|[1-9][0-9]*)$/.test(sizeText) || !Number.isSafeInteger(Number(sizeText))) {
    throw new ProofError(`checkpoint tree size must be a decimal integer, got ${JSON.stringify(sizeText)}`);
  }
  const root = b64decode(rootText);
  if (root.length !== HASH_BYTES) throw new ProofError(`checkpoint root hash is ${root.length} bytes, not ${HASH_BYTES}`);
  const extensions = lines.slice(3);
  let chain: string | null = null;
  for (const line of extensions) {
    if (!line.startsWith("chain ")) continue;
    chain = line.slice("chain ".length).toLowerCase();
    if (!/^[0-9a-f]{64}$/.test(chain)) throw new ProofError(`checkpoint chain line must be 64 hex digits: ${JSON.stringify(line)}`);
  }
  return { origin, size: Number(sizeText), root: toHex(root), chain, extensions };
}
