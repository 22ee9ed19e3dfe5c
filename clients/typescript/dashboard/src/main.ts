// The read-only dashboard served at /ui: ledgers, modules, restart timeline, live tail, verify.
// Everything goes through @nucleus-actors/client (same origin, optional read token).
import { NucleusApiError, NucleusClient, type Entry, type LifecycleEvent, type ModuleStatus } from "../../src/index.js";
import "./style.css";

const POLL_MS = 1000;
const TAIL_KEEP = 100;
const RATE_WINDOW_MS = 10_000;
const TIMELINE_MIN_SPAN_MS = 60_000;
const TOKEN_KEY = "nucleus-dashboard-token";

const $ = <T extends HTMLElement>(id: string): T => {
  const element = document.getElementById(id);
  if (!element) throw new Error(`#${id} is missing from the page`);
  return element as T;
};

function clientFor(token: string | null): NucleusClient {
  return new NucleusClient({ baseUrl: location.origin, token: token ?? undefined });
}

let client = clientFor(sessionStorage.getItem(TOKEN_KEY));
let ledger: string | null = new URLSearchParams(location.search).get("ledger");
let streams: AbortController | null = null;
let tailPaused = false;
let tailBuffer: Entry[] = [];
let events: LifecycleEvent[] = [];
let rateSamples: { t: number; length: number }[] = [];
let lastModules: ModuleStatus[] = [];

// -- connection status -------------------------------------------------------------------------
function setConnection(state: "live" | "reconnecting" | "connecting" | "unauthorized", text?: string): void {
  const element = $("connection");
  element.dataset.state = state;
  element.textContent = text ?? state;
}

function handleError(error: unknown): void {
  if (error instanceof NucleusApiError && error.status === 401) {
    setConnection("unauthorized", "needs a read token");
    $("token-form").hidden = false;
    return;
  }
  setConnection("reconnecting", "daemon unreachable, retrying…");
}

// -- ledgers -----------------------------------------------------------------------------------
async function loadLedgers(): Promise<void> {
  const ledgers = await client.ledgers();
  const nav = $("ledgers");
  nav.replaceChildren(
    ...ledgers.map((l) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.ledger = l.id;
      const name = document.createElement("span");
      name.textContent = l.id;
      const length = document.createElement("span");
      length.className = "ledger-length";
      button.append(name, length);
      labelLedger(button, l);
      button.addEventListener("click", () => select(l.id));
      return button;
    }),
  );
  if (ledger === null || !ledgers.some((l) => l.id === ledger)) ledger = ledgers[0]?.id ?? null;
  if (ledger !== null) select(ledger);
}

function labelLedger(button: HTMLElement, summary: { length: number; phase: string }): void {
  const length = button.querySelector(".ledger-length");
  if (length) length.textContent = String(summary.length);
  button.dataset.phase = summary.phase;
  button.title = `${summary.length} entries, ${summary.phase}`;
}

async function refreshLedgers(): Promise<void> {
  const summaries = await client.ledgers();
  for (const summary of summaries) {
    const button = $("ledgers").querySelector<HTMLElement>(`button[data-ledger="${CSS.escape(summary.id)}"]`);
    if (button) labelLedger(button, summary);
  }
}

function select(id: string): void {
  ledger = id;
  for (const button of $("ledgers").querySelectorAll<HTMLButtonElement>("button")) {
    button.setAttribute("aria-current", String(button.dataset.ledger === id));
  }
  const url = new URL(location.href);
  url.searchParams.set("ledger", id);
  history.replaceState(null, "", url);
  streams?.abort();
  streams = new AbortController();
  events = [];
  rateSamples = [];
  tailBuffer = [];
  $("tail").replaceChildren();
  $("verify-result").textContent = "";
  void followTail(id, streams.signal);
  void followEvents(id, streams.signal);
  void refresh();
}

// -- polling: overview and module table -----------------------------------------------------------
function short(hash: string): string {
  return `${hash.slice(0, 12)}…${hash.slice(-6)}`;
}

function cell(text: string, className?: string): HTMLTableCellElement {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function renderModules(modules: ModuleStatus[]): void {
  lastModules = modules;
  const rows = modules.map((m) => {
    const tr = document.createElement("tr");
    tr.dataset.module = m.id;
    tr.dataset.state = m.state;
    const lag = (m as ModuleStatus & { lag?: number }).lag;
    tr.append(
      cell(m.id, "id"),
      cell(m.state, `state state-${m.state}`),
      cell(String(m.incarnation), "incarnation"),
      cell(String(m.restarts), "restarts"),
      cell(String(m.crashes), "crashes"),
      cell(String(m.inbox_depth), "inbox"),
      cell(lag === undefined ? "–" : String(lag), "lag"),
      cell(m.last_error ?? "", "error"),
    );
    return tr;
  });
  $("modules").querySelector("tbody")?.replaceChildren(...rows);
}

async function refresh(): Promise<void> {
  const id = ledger;
  if (id === null) return;
  try {
    const [stats, modules] = await Promise.all([client.statistics(id), client.modules(id), refreshLedgers()]);
    if (id !== ledger) return;
    setConnection("live");
    $("token-form").hidden = true;
    $("stat-length").textContent = String(stats.length);
    $("stat-phase").textContent = stats.phase;
    $("stat-crashes").textContent = `${stats.crashes} / ${stats.restarts}`;
    const head = $("stat-head");
    head.textContent = short(stats.head);
    head.title = stats.head;
    const now = Date.now();
    rateSamples.push({ t: now, length: stats.length });
    rateSamples = rateSamples.filter((s) => now - s.t <= RATE_WINDOW_MS);
    const first = rateSamples[0];
    if (first && now - first.t > 0 && rateSamples.length > 1) {
      const rate = ((stats.length - first.length) * 1000) / (now - first.t);
      $("stat-rate").textContent = `${rate.toFixed(1)} /s`;
    }
    renderModules(modules);
    void refreshCheckpoint(id);
  } catch (error) {
    handleError(error);
  }
}

let checkpointChecked = 0;
async function refreshCheckpoint(id: string): Promise<void> {
  if (Date.now() - checkpointChecked < 10_000) return;
  checkpointChecked = Date.now();
  try {
    const note = await client.checkpoint(id);
    const element = $("stat-checkpoint");
    if (note === null) {
      element.textContent = "not served by this daemon";
      return;
    }
    const [origin, size] = note.split("\n");
    element.textContent = `${size} entries (${origin})`;
  } catch {
    // The overview already reports an unreachable daemon.
  }
}

// -- live tail ---------------------------------------------------------------------------------
function tailItem(entry: Entry): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.seq = String(entry.seq);
  li.value = entry.seq;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${entry.seq}`;
  const kind = document.createElement("span");
  kind.className = "kind";
  kind.textContent = entry.kind;
  const payload = document.createElement("code");
  payload.className = "payload";
  const text = JSON.stringify(entry.payload);
  payload.textContent = text.length > 160 ? `${text.slice(0, 160)}…` : text;
  const time = document.createElement("time");
  time.textContent = new Date(entry.timestamp / 1000).toISOString().slice(11, 23);
  li.append(seq, time, kind, payload);
  return li;
}

function showTail(entries: Entry[]): void {
  const list = $("tail");
  list.prepend(...entries.reverse().map(tailItem));
  while (list.children.length > TAIL_KEEP) list.lastElementChild?.remove();
}

async function followTail(id: string, signal: AbortSignal): Promise<void> {
  try {
    const { length } = await client.head(id);
    const from = Math.max(0, length - 20);
    for await (const entry of client.tail(id, { from, signal, retryMs: 1000, onDisconnect: handleError })) {
      setConnection("live");
      if (tailPaused) {
        tailBuffer.push(entry);
        $("tail-buffered").textContent = `${tailBuffer.length} new while paused`;
      } else {
        showTail([entry]);
      }
    }
  } catch (error) {
    if (!signal.aborted) {
      handleError(error);
      setTimeout(() => {
        if (!signal.aborted) void followTail(id, signal);
      }, 1000);
    }
  }
}

$("tail-toggle").addEventListener("click", () => {
  tailPaused = !tailPaused;
  $("tail-toggle").textContent = tailPaused ? "Resume" : "Pause";
  if (!tailPaused) {
    showTail(tailBuffer);
    tailBuffer = [];
    $("tail-buffered").textContent = "";
  }
});

// -- lifecycle events and the restart timeline -----------------------------------------------------
async function followEvents(id: string, signal: AbortSignal): Promise<void> {
  try {
    for await (const event of client.events(id, { signal, retryMs: 1000, onDisconnect: handleError })) {
      if (events.length > 0 && event.id <= (events[events.length - 1]?.id ?? 0)) {
        // A restarted daemon numbers its events from 1 again: keep the old ones for the chart.
        events = events.map((e) => ({ ...e, id: e.id - 1e9 }));
      }
      events.push(event);
      if (events.length > 2000) events = events.slice(-2000);
      renderTimeline();
      if (event.type !== "state" || event.state !== lastModules.find((m) => m.id === event.module)?.state) {
        void refresh();
      }
    }
  } catch (error) {
    if (!signal.aborted) handleError(error);
  }
}

const SVG = "http://www.w3.org/2000/svg";
function svg<K extends keyof SVGElementTagNameMap>(tag: K, attrs: Record<string, string | number>): SVGElementTagNameMap[K] {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  return element;
}

function renderTimeline(): void {
  const container = $("timeline");
  const modules = [...new Set([...lastModules.map((m) => m.id), ...events.map((e) => e.module)])];
  const width = Math.max(container.clientWidth, 280);
  const label = Math.min(140, width * 0.3);
  const rowHeight = 26;
  const height = Math.max(modules.length, 1) * rowHeight + 22;
  const now = Date.now();
  const times = events.map((e) => e.time / 1000);
  const end = Math.max(now, ...times);
  const start = Math.min(end - TIMELINE_MIN_SPAN_MS, ...times);
  const x = (t: number): number => label + ((t - start) / (end - start)) * (width - label - 10);
  const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "crashes and restarts over time" });
  modules.forEach((module, row) => {
    const y = row * rowHeight + rowHeight / 2;
    const name = svg("text", { x: 4, y: y + 4, class: "row-label" });
    name.textContent = module;
    chart.append(name, svg("line", { x1: label, x2: width - 10, y1: y, y2: y, class: "row-line" }));
    for (const event of events.filter((e) => e.module === module)) {
      const ex = x(event.time / 1000);
      const title = svg("title", {});
      title.textContent = `${new Date(event.time / 1000).toISOString()} ${event.type} → ${event.state}${event.last_error && event.type === "crash" ? `: ${event.last_error}` : ""}`;
      let mark: SVGElement;
      if (event.type === "crash") {
        mark = svg("path", { d: `M${ex} ${y - 11} L${ex + 6} ${y - 1} L${ex - 6} ${y - 1} Z`, class: "mark crash" });
      } else if (event.type === "restart") {
        mark = svg("circle", { cx: ex, cy: y + 5, r: 4.5, class: "mark restart" });
      } else {
        mark = svg("line", { x1: ex, x2: ex, y1: y - 7, y2: y + 7, class: `mark statechange state-${event.state}` });
      }
      mark.dataset.type = event.type;
      mark.dataset.module = module;
      mark.append(title);
      chart.append(mark);
    }
  });
  const axisY = height - 6;
  const from = svg("text", { x: label, y: axisY, class: "axis" });
  from.textContent = new Date(start).toISOString().slice(11, 19);
  const to = svg("text", { x: width - 10, y: axisY, class: "axis", "text-anchor": "end" });
  to.textContent = new Date(end).toISOString().slice(11, 19);
  chart.append(from, to);
  container.replaceChildren(chart);
}

// -- verify ------------------------------------------------------------------------------------
$("verify-form").addEventListener("submit", (event) => {
  event.preventDefault();
  void verify();
});

async function verify(): Promise<void> {
  const id = ledger;
  if (id === null) return;
  const result = $("verify-result");
  const button = $<HTMLButtonElement>("verify");
  const n = Math.max(1, Number($<HTMLInputElement>("verify-n").value) || 100);
  button.disabled = true;
  result.dataset.ok = "";
  result.textContent = "verifying…";
  try {
    const { length } = await client.head(id);
    const from = Math.max(0, length - n);
    const outcome = await client.verifyRange(id, { from, to: length });
    if (outcome.ok) {
      result.dataset.ok = "true";
      result.textContent = `✓ entries ${outcome.from}..${outcome.to - 1} verify (${outcome.checked} recomputed, checked against the ${outcome.anchor}); head ${short(outcome.head)}`;
    } else {
      result.dataset.ok = "false";
      result.dataset.seq = String(outcome.seq);
      result.textContent = `✗ seq ${outcome.seq} does not verify: ${outcome.reason}`;
    }
  } catch (error) {
    result.dataset.ok = "error";
    result.textContent = `could not verify: ${error instanceof Error ? error.message : String(error)}`;
    handleError(error);
  } finally {
    button.disabled = false;
  }
}

// -- token -------------------------------------------------------------------------------------
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $<HTMLInputElement>("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  client = clientFor(token || null);
  void start();
});

// -- start -------------------------------------------------------------------------------------
async function start(): Promise<void> {
  try {
    await loadLedgers();
  } catch (error) {
    handleError(error);
    setTimeout(() => void start(), POLL_MS);
  }
}

setInterval(() => void refresh(), POLL_MS);
setInterval(() => renderTimeline(), POLL_MS);
window.addEventListener("resize", () => renderTimeline());
void start();
