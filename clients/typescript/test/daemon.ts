// Start a real daemon (`nucleus run` on a temporary config) for the tests, and stop it.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
/** clients/typescript (tests run from build/test or build/e2e). */
export const PACKAGE_ROOT = resolve(HERE, "..", "..");
export const REPO_ROOT = resolve(PACKAGE_ROOT, "..", "..");
const FIXTURES = join(PACKAGE_ROOT, "test", "fixtures");

export function python(): string {
  if (process.env.NUCLEUS_PYTHON) return process.env.NUCLEUS_PYTHON;
  if (process.env.VENV) return join(process.env.VENV, "bin", "python");
  return "python3";
}

export const DEFAULT_CONFIG = `
on_ledger_failure = "serve"

[[ledgers]]
id = "main"
storage = "main.db"
durability = "normal"
max_restarts = 50
restart_window = 1.0

[[ledgers.modules]]
use = "nucleus_fixture_mods:CrashOnCue"

[[ledgers.modules]]
use = "kind-counter"

[[ledgers]]
id = "aux"
storage = ":memory:"
`;

/** A daemon subprocess on a temporary directory; `url` once it listens. */
export class TestDaemon {
  readonly dir: string;
  readonly config: string;
  url = "";
  log = "";
  private proc: ChildProcess | undefined;

  constructor(configText: string = DEFAULT_CONFIG, private readonly env: Record<string, string> = {}) {
    this.dir = mkdtempSync(join(tmpdir(), "nucleus-ts-"));
    this.config = join(this.dir, "nucleus.toml");
    writeFileSync(this.config, configText);
  }

  /**
   * Start `nucleus run CONFIG --port P` (0: a free port) and wait for `listening on URL`. A
   * restart on the same port retries for a while if the port is still (or again) taken.
   */
  async start(port = 0): Promise<string> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.startOnce(port);
      } catch (error) {
        if (port === 0 || attempt >= 20 || !this.log.includes("cannot listen")) throw error;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }

  private async startOnce(port: number): Promise<string> {
    const env: NodeJS.ProcessEnv = { ...process.env, ...this.env };
    if (!("NUCLEUS_TOKEN" in this.env)) delete env.NUCLEUS_TOKEN;
    env.PYTHONPATH = [REPO_ROOT, FIXTURES, process.env.PYTHONPATH].filter(Boolean).join(":");
    const proc = spawn(python(), ["-m", "nucleus_actors", "run", this.config, "--port", String(port)], {
      env,
      stdio: ["ignore", "ignore", "pipe"],
    });
    this.proc = proc;
    this.log = "";
    this.url = await new Promise<string>((resolveUrl, reject) => {
      const timer = setTimeout(() => reject(new Error(`daemon did not listen within 60 s:\n${this.log}`)), 60_000);
      proc.stderr?.setEncoding("utf8");
      proc.stderr?.on("data", (chunk: string) => {
        this.log += chunk;
        const match = /listening on (http:\/\/\S+)/.exec(this.log);
        if (match) {
          clearTimeout(timer);
          resolveUrl((match[1] as string).replace(/["',]+$/, ""));
        }
      });
      proc.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`daemon exited with ${code} before listening:\n${this.log}`));
      });
    });
    return this.url;
  }

  /** The port it listens on. */
  get port(): number {
    return Number(new URL(this.url).port);
  }

  /** SIGTERM and wait for the exit (kill after 30 s). */
  async stop(): Promise<number | null> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return proc?.exitCode ?? null;
    const exited = new Promise<number | null>((resolveExit) => proc.on("exit", (code) => resolveExit(code)));
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 30_000);
    const code = await exited;
    clearTimeout(timer);
    return code;
  }

  /** Run Python code with this checkout's package importable; returns stdout. */
  static async python(code: string, ...args: string[]): Promise<string> {
    return TestDaemon.run(["-c", code, ...args]);
  }

  /** `python ARGS...` with this checkout's package importable; returns stdout, throws on exit != 0. */
  static async run(args: string[]): Promise<string> {
    const env: NodeJS.ProcessEnv = { ...process.env };
    env.PYTHONPATH = [REPO_ROOT, FIXTURES, process.env.PYTHONPATH].filter(Boolean).join(":");
    const proc = spawn(python(), args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    proc.stdout?.setEncoding("utf8").on("data", (c: string) => (out += c));
    proc.stderr?.setEncoding("utf8").on("data", (c: string) => (err += c));
    const code_ = await new Promise<number | null>((r) => proc.on("exit", r));
    if (code_ !== 0) throw new Error(`python failed (${code_}):\n${err}`);
    return out;
  }
}

/** `nucleus keygen NAME --out FILE`: writes a checkpoint signer key, returns its verifier key. */
export async function keygen(name: string, file: string): Promise<string> {
  return (await TestDaemon.run(["-m", "nucleus_actors", "keygen", name, "--out", file])).trim();
}

/**
 * POST JSON to the daemon (tests write through HTTP; the client is read-only). A fresh
 * connection each time (node:http, no agent): a pooled keep-alive socket the daemon closed
 * while idle would fail the request, and a POST must not be retried blindly.
 */
export function append(
  url: string,
  ledger: string,
  kind: string,
  payload: unknown,
  meta: Record<string, string> = {},
  token?: string,
): Promise<{ seq: number; hash: string; timestamp: number }> {
  const body = JSON.stringify({ kind, payload, meta });
  const auth: Record<string, string> = token === undefined ? {} : { Authorization: `Bearer ${token}` };
  return new Promise((resolveReceipt, reject) => {
    const request = httpRequest(
      `${url}/v1/ledgers/${ledger}/records`,
      { method: "POST", agent: false, headers: { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), ...auth } },
      (response) => {
        let text = "";
        response.setEncoding("utf8");
        response.on("data", (chunk: string) => (text += chunk));
        response.on("end", () => {
          if (response.statusCode !== 201) reject(new Error(`append failed: ${response.statusCode} ${text}`));
          else resolveReceipt(JSON.parse(text) as { seq: number; hash: string; timestamp: number });
        });
      },
    );
    request.on("error", reject);
    request.end(body);
  });
}

/** Change the payload of entry `seq` in a SQLite ledger file (keeping valid JSON), as an attacker would. */
export async function tamper(dbPath: string, seq: number): Promise<void> {
  await TestDaemon.python(
    `
import json, sqlite3, sys
path, seq = sys.argv[1], int(sys.argv[2])
conn = sqlite3.connect(path)
(canonical,) = conn.execute("SELECT canonical FROM entries WHERE seq = ?", (seq,)).fetchone()
record = json.loads(canonical)
record["payload"] = {"tampered": True}
conn.execute("UPDATE entries SET canonical = ? WHERE seq = ?", (json.dumps(record, sort_keys=True, separators=(",", ":")).encode(), seq))
conn.commit()
conn.close()
`,
    dbPath,
    String(seq),
  );
}

/** Poll `check` until it returns a value (not undefined) or `ms` pass. */
export async function eventually<T>(check: () => Promise<T | undefined>, ms = 10_000, what = "condition"): Promise<T> {
  const deadline = Date.now() + ms;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() > deadline) throw new Error(`${what} not reached within ${ms} ms${lastError ? `: ${String(lastError)}` : ""}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
