/**
 * `NucleusClient`: a typed, read-only client of the nucleus_actors ledger daemon over `fetch`.
 *
 * Read-only by design: there is no append. Writes go through the HTTP API directly or through
 * Python; the core (the daemon) is the source of truth, this is a proxy that can check it.
 */
import type { components, paths } from "./generated/openapi.js";
import { parseEventStream } from "./sse.js";
import {
  canonicalBytes,
  ChainVerifier,
  genesis,
  leafHash,
  merkleRoot,
  ProofError,
  recordOf,
  toHex,
  verifyCheckpoint,
  verifyConsistency,
  verifyInclusion,
  type ChainBreak,
  type Checkpoint,
} from "./verify.js";

type Schemas = components["schemas"];
/** A committed entry (`seq`, `kind`, `payload`, `meta`, `timestamp`, `hash`). */
export type Entry = Schemas["EntryOut"];
/** A ledger's length, head hash and phase. */
export type Head = Schemas["HeadOut"];
/** One ledger of the daemon (`id`, `length`, `phase`). */
export type LedgerSummary = Schemas["LedgerOut"];
/** A module's status snapshot. */
export type ModuleStatus = Schemas["ModuleStatusOut"];
/** A ledger's counters (`GET .../statistics`). */
export type Statistics = Schemas["StatisticsOut"];
/** A page of a range read. */
export type Page = Schemas["PageOut"];
/** An inclusion proof as the daemon sends it (`GET .../proof/inclusion`), hashes in hex. */
export type InclusionProof = Schemas["InclusionProofOut"];
/** A consistency proof as the daemon sends it (`GET .../proof/consistency`), hashes in hex. */
export type ConsistencyProof = Schemas["ConsistencyProofOut"];
/** An RFC 9457 problem object. */
export type Problem = Schemas["ProblemOut"];
/** A module lifecycle event (`GET .../events`). */
export type LifecycleEvent =
  paths["/v1/ledgers/{ledger}/events"]["get"]["responses"][200]["content"]["text/event-stream"];

/** Optional routes a daemon serves (`NucleusClient.features()`). */
export interface Features {
  /** `GET /v1/ledgers/{id}/checkpoint` (signed checkpoints). */
  checkpoint: boolean;
  /** `GET /v1/ledgers/{id}/proof/inclusion` and `/proof/consistency`. */
  proofs: boolean;
  /** `GET /v1/ledgers/{id}/statistics`. */
  statistics: boolean;
  /** `GET /v1/ledgers/{id}/events`. */
  events: boolean;
}

/** How to reach the daemon. */
export interface ClientOptions {
  /** The daemon's base URL, e.g. `http://127.0.0.1:8470` (a path prefix is kept). */
  baseUrl: string;
  /** Bearer token sent with every request (for daemons with `reads = "token"`). */
  token?: string | undefined;
  /** The `fetch` to use (default: the global one). */
  fetch?: typeof fetch;
  /** Entries per page of `read` (1..1000, default 500). */
  pageSize?: number;
  /**
   * The daemon's checkpoint verifier key (`name+keyid+base64`, printed by `nucleus keygen`):
   * the default `vkey` of `verifyRange`, `verifiedCheckpoint`, `proveInclusion` and
   * `proveConsistency`, so that ranges are checked against the signed checkpoint.
   */
  vkey?: string | undefined;
}

/** The daemon answered with an error (a problem object when it sent one). */
export class NucleusApiError extends Error {
  override name = "NucleusApiError";
  constructor(
    /** HTTP status. */
    readonly status: number,
    /** The problem details, when the body was one. */
    readonly problem: Problem | undefined,
    /** The request path. */
    readonly path: string,
  ) {
    super(`${status} from ${path}: ${problem ? `${problem.title}: ${problem.detail}` : "no problem body"}`);
  }

  /** The problem type's slug (`unknown-seq`, `ledger-unavailable`...), if any. */
  get slug(): string | undefined {
    return this.problem?.type.split("/").pop();
  }
}

/** Options of a tail. */
export interface TailOptions {
  /** First seq to send (default: the head at the time of the first connection). */
  from?: number;
  /** Aborts the tail: the iterator ends (no error). */
  signal?: AbortSignal;
  /** Reconnect after the stream breaks (default true); resumes after the last seq seen. */
  reconnect?: boolean;
  /** Milliseconds between reconnection attempts (default 1000). */
  retryMs?: number;
  /** Called when the stream breaks and a reconnection is coming. */
  onDisconnect?: (error: unknown) => void;
}

/** Result of `verifyRange`. */
export type VerifyResult =
  | {
      ok: true;
      /** `CHAIN_{to-1}` recomputed from the entries (hex): equal to the daemon's head when `to` is the length. */
      head: string;
      /** The range checked, half-open. */
      from: number;
      to: number;
      /** Entries whose hashes were recomputed. */
      checked: number;
      /** What the last hash was compared with ("head", "entry", or "checkpoint"). */
      anchor: "head" | "entry" | "checkpoint";
    }
  | ChainBreak;

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/** A typed, read-only client of one daemon. Every method may throw `NucleusApiError`. */
export class NucleusClient {
  readonly baseUrl: string;
  private readonly token: string | undefined;
  private readonly fetchFn: typeof fetch;
  private readonly pageSize: number;
  private readonly vkey: string | undefined;

  constructor(options: ClientOptions) {
    this.vkey = options.vkey;
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.token = options.token;
    this.fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.pageSize = options.pageSize ?? 500;
    if (!Number.isInteger(this.pageSize) || this.pageSize < 1 || this.pageSize > 1000) {
      throw new RangeError(`pageSize must be an integer in 1..1000, got ${this.pageSize}`);
    }
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return this.token ? { Authorization: `Bearer ${this.token}`, ...extra } : extra;
  }

  private async request(path: string, init: RequestInit = {}, accept = "application/json"): Promise<Response> {
    const request: RequestInit = {
      ...init,
      headers: this.headers({ Accept: accept, ...(init.headers as Record<string, string> | undefined) }),
    };
    let response: Response;
    try {
      response = await this.fetchFn(this.baseUrl + path, request);
    } catch (error) {
      // Every call is an idempotent GET: try once more when the connection failed (a pooled
      // keep-alive connection the server closed while idle fails the next request on it).
      if (init.signal?.aborted || !(error instanceof TypeError)) throw error;
      response = await this.fetchFn(this.baseUrl + path, request);
    }
    if (!response.ok) {
      let problem: Problem | undefined;
      try {
        problem = (await response.json()) as Problem;
      } catch {
        problem = undefined;
      }
      throw new NucleusApiError(response.status, problem, path);
    }
    return response;
  }

  private async json<T>(path: string): Promise<T> {
    return (await (await this.request(path)).json()) as T;
  }

  private static ledgerPath(id: string): string {
    return `/v1/ledgers/${encodeURIComponent(id)}`;
  }

  /** Every ledger of the daemon, in configuration order. */
  async ledgers(): Promise<LedgerSummary[]> {
    return (await this.json<Schemas["LedgersOut"]>("/v1/ledgers")).ledgers;
  }

  /** A ledger's length, head hash and phase. */
  async head(id: string): Promise<Head> {
    return this.json<Head>(`${NucleusClient.ledgerPath(id)}/head`);
  }

  /** One entry (throws `NucleusApiError` with slug `unknown-seq` past the head). */
  async get(id: string, seq: number): Promise<Entry> {
    return this.json<Entry>(`${NucleusClient.ledgerPath(id)}/records/${seq}`);
  }

  /**
   * The entries `from <= seq < to` (half-open; `to` defaults to the length when the read
   * starts), fetched page by page as the iteration goes on. Stops early at the head.
   */
  async *read(id: string, range: { from?: number; to?: number } = {}): AsyncGenerator<Entry, void, undefined> {
    let start: number | null = range.from ?? 0;
    const to = range.to ?? (await this.head(id)).length;
    if (!Number.isInteger(start) || start < 0 || !Number.isInteger(to)) {
      throw new RangeError(`read needs integer from >= 0 and to, got from=${range.from} to=${range.to}`);
    }
    while (start !== null && start < to) {
      const limit = Math.min(this.pageSize, to - start);
      const page: Page = await this.json<Page>(
        `${NucleusClient.ledgerPath(id)}/records?start=${start}&limit=${limit}`,
      );
      if (page.entries.length === 0) return;
      for (const entry of page.entries) {
        if (entry.seq >= to) return;
        yield entry;
      }
      start = page.next ?? null;
    }
  }

  /** Module statuses of a ledger, in start order. */
  async modules(id: string): Promise<ModuleStatus[]> {
    return (await this.json<Schemas["ModulesOut"]>(`${NucleusClient.ledgerPath(id)}/modules`)).modules;
  }

  /** A ledger's counters (appends, rejects, crashes, restarts, module states). */
  async statistics(id: string): Promise<Statistics> {
    return this.json<Statistics>(`${NucleusClient.ledgerPath(id)}/statistics`);
  }

  private featuresCache: Promise<Features> | undefined;

  /**
   * What this daemon serves beyond the core API, read once from its `/openapi.json` (so that
   * optional calls are not tried, and no 404 is logged, on daemons without them).
   */
  features(): Promise<Features> {
    this.featuresCache ??= this.json<{ paths?: Record<string, unknown> }>("/openapi.json").then(
      (document) => {
        const paths = new Set(Object.keys(document.paths ?? {}));
        return {
          checkpoint: paths.has("/v1/ledgers/{ledger}/checkpoint"),
          proofs: paths.has("/v1/ledgers/{ledger}/proof/inclusion") && paths.has("/v1/ledgers/{ledger}/proof/consistency"),
          statistics: paths.has("/v1/ledgers/{ledger}/statistics"),
          events: paths.has("/v1/ledgers/{ledger}/events"),
        };
      },
      (error: unknown) => {
        this.featuresCache = undefined;
        throw error;
      },
    );
    return this.featuresCache;
  }

  /**
   * The ledger's signed checkpoint (a C2SP signed note), or `null` when this daemon does not
   * serve checkpoints (see `features()`).
   */
  async checkpoint(id: string): Promise<string | null> {
    if (!(await this.features()).checkpoint) return null;
    try {
      return await (await this.request(`${NucleusClient.ledgerPath(id)}/checkpoint`, {}, "text/plain")).text();
    } catch (error) {
      if (error instanceof NucleusApiError && error.status === 404 && error.slug !== "unknown-ledger") return null;
      throw error;
    }
  }

  /**
   * Inclusion proof of entry `seq` in the tree of `size` entries (default: the length), as the
   * daemon sends it: unchecked (see `proveInclusion`). Daemons with proofs.
   */
  async inclusionProof(id: string, seq: number, size?: number): Promise<InclusionProof> {
    const query = size === undefined ? `seq=${seq}` : `seq=${seq}&size=${size}`;
    return this.json(`${NucleusClient.ledgerPath(id)}/proof/inclusion?${query}`);
  }

  /**
   * Consistency proof between the trees of `from` and `to` entries (default: the length), as
   * the daemon sends it: unchecked (see `proveConsistency`). Daemons with proofs.
   */
  async consistencyProof(id: string, from: number, to?: number): Promise<ConsistencyProof> {
    const query = to === undefined ? `from=${from}` : `from=${from}&to=${to}`;
    return this.json(`${NucleusClient.ledgerPath(id)}/proof/consistency?${query}`);
  }

  private keyOf(vkey: string | undefined, call: string): string {
    const key = vkey ?? this.vkey;
    if (key === undefined) throw new TypeError(`${call} needs a verifier key: pass { vkey } or set it in the client options`);
    return key;
  }

  /**
   * The ledger's checkpoint, its signature checked with `vkey` (default: the client's):
   * `{origin, size, root, chain}`, or `null` when the daemon serves no checkpoint. Throws
   * `ProofError` naming what failed when the note does not verify with that key.
   */
  async verifiedCheckpoint(id: string, options: { vkey?: string } = {}): Promise<Checkpoint | null> {
    const key = this.keyOf(options.vkey, "verifiedCheckpoint");
    const note = await this.checkpoint(id);
    return note === null ? null : verifyCheckpoint(note, key);
  }

  /**
   * Prove that entry `seq`, as the daemon serves it, is in the signed checkpoint: verifies the
   * checkpoint with `vkey`, recomputes the entry's leaf hash from its content (RFC 8785 +
   * blake3, not trusting the hash the daemon sends) and checks the daemon's inclusion proof at
   * the checkpoint's size against the signed root. Returns the entry and the checkpoint;
   * throws `ProofError` saying what failed (signature, entry content, proof).
   */
  async proveInclusion(id: string, seq: number, options: { vkey?: string } = {}): Promise<{ entry: Entry; checkpoint: Checkpoint }> {
    const checkpoint = await this.verifiedCheckpoint(id, { vkey: this.keyOf(options.vkey, "proveInclusion") });
    if (checkpoint === null) throw new ProofError(`ledger ${id} serves no checkpoint: nothing to prove against`);
    if (!(Number.isInteger(seq) && seq >= 0 && seq < checkpoint.size)) {
      throw new ProofError(`entry ${seq} is not below the checkpoint's size ${checkpoint.size}`);
    }
    const [entry, proof] = await Promise.all([this.get(id, seq), this.inclusionProof(id, seq, checkpoint.size)]);
    const leaf = toHex(leafHash(canonicalBytes(recordOf(entry))));
    if (proof.leaf !== leaf) throw new ProofError(`entry ${seq}: its content hashes to leaf ${leaf}, the proof is for ${proof.leaf}`);
    verifyInclusion(leaf, seq, checkpoint.size, proof.path, checkpoint.root);
    return { entry, checkpoint };
  }

  /**
   * Prove that the ledger only grew since an older checkpoint note you kept (what a monitor
   * checks): verifies both that note and the daemon's current checkpoint with `vkey`, then the
   * daemon's consistency proof between their sizes. Returns both checkpoints; throws
   * `ProofError` saying what failed (a rewritten or shortened history fails here).
   */
  async proveConsistency(id: string, olderNote: string, options: { vkey?: string } = {}): Promise<{ older: Checkpoint; newer: Checkpoint }> {
    const key = this.keyOf(options.vkey, "proveConsistency");
    const older = verifyCheckpoint(olderNote, key);
    const newer = await this.verifiedCheckpoint(id, { vkey: key });
    if (newer === null) throw new ProofError(`ledger ${id} serves no checkpoint: nothing to prove against`);
    if (newer.size < older.size) {
      throw new ProofError(`the ledger shrank: the older checkpoint has ${older.size} entries, the current one ${newer.size}`);
    }
    if (older.size === newer.size || older.size === 0) {
      // Nothing to prove in between: the same tree must have the same root (and chain).
      if (older.size === newer.size && (older.root !== newer.root || older.chain !== newer.chain)) {
        throw new ProofError(`two checkpoints of ${older.size} entries with different roots: history was rewritten`);
      }
      return { older, newer };
    }
    const proof = await this.consistencyProof(id, older.size, newer.size);
    verifyConsistency(older.size, newer.size, proof.path, older.root, newer.root);
    return { older, newer };
  }

  /**
   * Follow new entries (server-sent events over `fetch`, so the token is sent). Yields every
   * entry from `from` (default: the head), then each new one as it commits. When the stream
   * breaks (daemon restart, network) it reconnects after `retryMs`, resuming after the last
   * seq it yielded (`Last-Event-ID`): no entry is skipped or repeated. Ends when `signal`
   * aborts, or when the stream breaks and `reconnect` is false.
   */
  async *tail(id: string, options: TailOptions = {}): AsyncGenerator<Entry, void, undefined> {
    const { signal, reconnect = true, retryMs = 1000 } = options;
    // The seq of the last entry yielded (or the one before `from`): every (re)connection
    // resumes right after it.
    let last = options.from === undefined ? (await this.head(id)).length - 1 : options.from - 1;
    while (!signal?.aborted) {
      const headers: Record<string, string> = {};
      let query = "";
      if (last >= 0) headers["Last-Event-ID"] = String(last);
      else query = "?from=0";
      try {
        const init: RequestInit = { headers };
        if (signal) init.signal = signal;
        const response = await this.request(`${NucleusClient.ledgerPath(id)}/stream${query}`, init, "text/event-stream");
        if (!response.body) throw new Error("the stream has no body");
        for await (const event of parseEventStream(response.body)) {
          if (event.event === "entry") {
            const entry = JSON.parse(event.data) as Entry;
            if (entry.seq <= last) continue;
            last = entry.seq;
            yield entry;
          } else if (event.event === "error") {
            throw new NucleusApiError(503, JSON.parse(event.data) as Problem, `${NucleusClient.ledgerPath(id)}/stream`);
          }
        }
        throw new Error("the stream ended");
      } catch (error) {
        if (signal?.aborted) return;
        if (!reconnect) throw error;
        if (error instanceof NucleusApiError && error.status < 500 && error.status !== 408 && error.status !== 429) throw error;
        options.onDisconnect?.(error);
        await sleep(retryMs, signal);
      }
    }
  }

  /**
   * Follow module lifecycle events (crashes, restarts, state changes): the kept history after
   * `after` first, then live ones; reconnects and resumes like `tail`.
   */
  async *events(
    id: string,
    options: { after?: number; signal?: AbortSignal; reconnect?: boolean; retryMs?: number; onDisconnect?: (error: unknown) => void } = {},
  ): AsyncGenerator<LifecycleEvent, void, undefined> {
    const { signal, reconnect = true, retryMs = 1000 } = options;
    let last = options.after ?? 0;
    while (!signal?.aborted) {
      try {
        const init: RequestInit = { headers: { "Last-Event-ID": String(last) } };
        if (signal) init.signal = signal;
        const response = await this.request(`${NucleusClient.ledgerPath(id)}/events`, init, "text/event-stream");
        if (!response.body) throw new Error("the stream has no body");
        for await (const event of parseEventStream(response.body)) {
          if (event.event !== "lifecycle") continue;
          const data = JSON.parse(event.data) as LifecycleEvent;
          last = data.id;
          yield data;
        }
        throw new Error("the stream ended");
      } catch (error) {
        if (signal?.aborted) return;
        if (!reconnect) throw error;
        if (error instanceof NucleusApiError && error.status < 500) throw error;
        options.onDisconnect?.(error);
        await sleep(retryMs, signal);
        // A restarted daemon numbers its events from 1 again: ask for all it kept.
        const stats = await this.statistics(id).catch(() => undefined);
        if (stats && stats.last_event < last) last = 0;
      }
    }
  }

  /**
   * Verify entries `from <= seq < to` on this side: recompute each entry's canonical bytes
   * (RFC 8785), leaf and chain hash (blake3), check them against the hashes the daemon sent,
   * and check the last one against the head (when `to` is the length). With a verifier key
   * (`vkey`, default: the client's) and a daemon that serves checkpoints, the checked entries
   * are also tied to the signed checkpoint: its root must be the root of the checked prefix
   * (or a consistency proof must lead there; for a slice not starting at 0, an inclusion proof
   * of its last entry in the signed tree), and its `chain` line must equal the recomputed chain
   * when the checkpoint's size falls in the range; then `anchor` is "checkpoint".
   *
   * A range that does not start at 0 starts from the hash of entry `from - 1` as the daemon
   * reports it. Returns `{ok: true, head}` or `{ok: false, seq, reason}` naming the first seq
   * that does not verify. Throws `ProofError` when the checkpoint's signature does not verify
   * with `vkey` (the daemon or the key is not the one expected: no entry is at fault).
   */
  async verifyRange(id: string, range: { from?: number; to?: number; vkey?: string } = {}): Promise<VerifyResult> {
    const head = await this.head(id);
    const from = range.from ?? 0;
    const to = Math.min(range.to ?? head.length, head.length);
    if (from < 0 || from > to) throw new RangeError(`verifyRange needs 0 <= from <= to, got from=${from} to=${to}`);
    const vkey = range.vkey ?? this.vkey;
    const prev = from === 0 ? toHex(genesis(id)) : (await this.get(id, from - 1)).hash;
    const verifier = new ChainVerifier(prev, from);
    // With a key: every leaf and chain hash, to compare with the signed checkpoint.
    const leaves: Uint8Array[] = [];
    const chains: string[] = [];
    for await (const entry of this.read(id, { from, to })) {
      const broken = verifier.feed(entry);
      if (broken) return broken;
      if (vkey !== undefined) {
        leaves.push(leafHash(canonicalBytes(recordOf(entry))));
        chains.push(verifier.head);
      }
    }
    if (verifier.next !== to) {
      return { ok: false, seq: verifier.next, reason: `the daemon sent entries up to ${verifier.next - 1}, expected up to ${to - 1}` };
    }
    let anchor: "head" | "entry" | "checkpoint" = "entry";
    if (to === head.length) {
      const now = to === 0 ? prev : verifier.head;
      if (now !== head.head) {
        return { ok: false, seq: Math.max(to - 1, 0), reason: `recomputed chain ${now} differs from the daemon's head ${head.head}` };
      }
      anchor = "head";
    }
    if (vkey !== undefined && to > from) {
      const note = await this.checkpoint(id);
      const checkpoint = note === null ? null : verifyCheckpoint(note, vkey);
      // The last checked entry inside the signed tree (below `from`: the checkpoint covers none).
      const covered = checkpoint === null ? -1 : Math.min(to, checkpoint.size) - 1;
      if (checkpoint !== null && covered >= from) {
        const { size } = checkpoint;
        if (checkpoint.chain !== null && size <= to) {
          const ours = size === from ? prev : (chains[size - 1 - from] as string);
          if (ours !== checkpoint.chain) {
            return { ok: false, seq: size - 1, reason: `entries up to ${size - 1} chain to ${ours}, the signed checkpoint says ${checkpoint.chain}` };
          }
        }
        try {
          if (from === 0 && size <= to) {
            // The signed tree is a prefix of what was checked: recompute its root.
            const root = toHex(merkleRoot(leaves.slice(0, size)));
            if (root !== checkpoint.root) {
              return { ok: false, seq: size - 1, reason: `entries 0..${size - 1} hash to root ${root}, the signed checkpoint says ${checkpoint.root}` };
            }
          } else if (from === 0) {
            // What was checked is a prefix of the signed tree: a consistency proof links them.
            const proof = await this.consistencyProof(id, to, size);
            verifyConsistency(to, size, proof.path, merkleRoot(leaves), checkpoint.root);
          } else {
            // A slice: its last signed entry must be in the signed tree (the chain links the rest).
            const proof = await this.inclusionProof(id, covered, size);
            verifyInclusion(leaves[covered - from] as Uint8Array, covered, size, proof.path, checkpoint.root);
          }
        } catch (error) {
          if (error instanceof ProofError) return { ok: false, seq: covered, reason: `checkpoint of ${size} entries: ${error.message}` };
          throw error;
        }
        anchor = "checkpoint";
      }
    }
    return { ok: true, head: verifier.head, from, to, checked: verifier.checked, anchor };
  }
}
