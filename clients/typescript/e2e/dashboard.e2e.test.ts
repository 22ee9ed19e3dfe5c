// The dashboard in a real browser: Debian's Chromium driven by playwright-core (nothing is
// downloaded). The daemon is a real `nucleus run` on a temporary config.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { chromium, type BrowserContext, type ConsoleMessage, type Page } from "playwright-core";
import { append, keygen, PACKAGE_ROOT, REPO_ROOT, tamper, TestDaemon } from "../test/daemon.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = process.env.NUCLEUS_ARTIFACTS ?? join(PACKAGE_ROOT, "artifacts");
const FAST = 2_000; // the bound for a crash to show up

const daemon = new TestDaemon();
let context: BrowserContext;
let page: Page;
let profile: string;
const consoleErrors: string[] = [];
let collectErrors = true;

before(async () => {
  await daemon.start();
  for (let i = 0; i < 5; i++) await append(daemon.url, "main", "order.created", { id: i, text: "caf\u00e9" });
  profile = mkdtempSync(join(tmpdir(), "nucleus-chromium-"));
  // A fresh profile directory per run (persistent context = Chromium's --user-data-dir).
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    viewport: { width: 1280, height: 900 },
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-gpu",
    ],
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (message: ConsoleMessage) => {
    // A ledger without a checkpoint key answers its checkpoint with 404 `no-checkpoint` by
    // design (the page then says "not served"); Chromium logs every 404 fetch as an error.
    const optional404 = message.text().includes("status of 404") && message.location().url.endsWith("/checkpoint");
    if (collectErrors && message.type() === "error" && !optional404) consoleErrors.push(message.text());
  });
  page.on("pageerror", (error) => consoleErrors.push(`pageerror: ${error.message}`));
});

after(async () => {
  await context?.close();
  await daemon.stop();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

async function screenshot(name: string): Promise<string> {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, name);
  await page.screenshot({ path, fullPage: true });
  return path;
}

describe("the dashboard at /ui", () => {
  test("the committed build is what the sources build to", () => {
    const out = mkdtempSync(join(tmpdir(), "nucleus-ui-"));
    const result = spawnSync(process.execPath, [join(PACKAGE_ROOT, "scripts", "build-ui.mjs")], {
      env: { ...process.env, NUCLEUS_UI_OUT: out },
      encoding: "utf8",
    });
    assert.equal(result.status, 0, result.stderr);
    const committed = join(REPO_ROOT, "nucleus_actors", "daemon", "dashboard");
    const list = (dir: string): string[] =>
      readdirSync(dir, { recursive: true, withFileTypes: true })
        .filter((d) => d.isFile())
        .map((d) => join(d.parentPath, d.name).slice(dir.length + 1))
        .sort();
    assert.deepEqual(list(out), list(committed), "run `npm run build:ui` and commit nucleus_actors/daemon/dashboard");
    for (const name of list(out)) {
      assert.ok(readFileSync(join(out, name)).equals(readFileSync(join(committed, name))), `${name} is stale: run \`npm run build:ui\``);
    }
    rmSync(out, { recursive: true, force: true });
  });

  test("loads with no console errors and shows ledgers, modules and the tail", async () => {
    await page.goto(`${daemon.url}/ui`);
    await page.locator("#connection[data-state=live]").waitFor();
    await page.locator('#modules tr[data-module="crasher"][data-state="running"]').waitFor();
    await page.locator('#tail li[data-seq="4"]').waitFor();
    await page.locator("#stat-length", { hasText: /^5$/ }).waitFor();
    const tabs = page.locator("#ledgers button");
    assert.deepEqual(await tabs.evaluateAll((buttons) => buttons.map((b) => (b as HTMLElement).dataset.ledger)), ["main", "aux"]);
    await page.locator('#ledgers button[data-ledger="main"] .ledger-length', { hasText: "5" }).waitFor();
    // The checkpoint panel fills in when its own fetch (a 404 here) answers: wait for it.
    await page.locator("#stat-checkpoint", { hasText: "not served by this daemon" }).waitFor();
    await page.waitForTimeout(1200); // a few polls and both streams running
    assert.deepEqual(consoleErrors, []);
  });

  test("a new append appears in the live tail; pause holds it back until resume", async () => {
    const receipt = await append(daemon.url, "main", "order.paid", { id: 99, amount: 12.5 });
    const item = page.locator(`#tail li[data-seq="${receipt.seq}"]`);
    await item.waitFor({ timeout: FAST });
    assert.match((await item.textContent()) ?? "", /order\.paid/);
    await page.locator("#tail-toggle").click();
    const held = await append(daemon.url, "main", "order.held", null);
    await page.locator("#tail-buffered").getByText("1 new while paused").waitFor();
    assert.equal(await page.locator(`#tail li[data-seq="${held.seq}"]`).count(), 0);
    await page.locator("#tail-toggle").click();
    await page.locator(`#tail li[data-seq="${held.seq}"]`).waitFor({ timeout: FAST });
  });

  test("a crash shows in the module table and the timeline within 2 s", async () => {
    await append(daemon.url, "main", "crash", null);
    const started = Date.now();
    await page.locator('#modules tr[data-module="crasher"] td.crashes', { hasText: "1" }).waitFor({ timeout: FAST });
    await page.locator('#timeline [data-type="crash"][data-module="crasher"]').waitFor({ timeout: FAST - (Date.now() - started) });
    const row = page.locator('#modules tr[data-module="crasher"]');
    assert.match((await row.locator("td.error").textContent()) ?? "", /crash on cue/);
    await page.locator('#timeline [data-type="restart"][data-module="crasher"]').waitFor({ timeout: FAST * 2 });
    await row.and(page.locator('[data-state="running"]')).waitFor({ timeout: FAST * 2 });
    assert.equal(await row.locator("td.restarts").textContent(), "1");
    assert.equal(await row.locator("td.incarnation").textContent(), "2");
    assert.deepEqual(consoleErrors, []);
    const shot = await screenshot("dashboard.png");
    assert.ok(readFileSync(shot).length > 10_000);
  });

  test("verify succeeds, then names the seq after the SQLite file is tampered with", async () => {
    await page.locator("#verify").click();
    await page.locator('#verify-result[data-ok="true"]').waitFor({ timeout: 10_000 });
    assert.match((await page.locator("#verify-result").textContent()) ?? "", /verify/);

    collectErrors = false; // the browser logs the refused connections while the daemon is down
    await daemon.stop();
    await tamper(join(daemon.dir, "main.db"), 3);
    await daemon.start(daemon.port);
    // The page reconnects by itself (no reload) and then verifies in the browser again.
    await page.locator("#connection[data-state=live]").waitFor({ timeout: 15_000 });
    await page.locator("#verify").click();
    await page.locator('#verify-result[data-ok="false"]').waitFor({ timeout: 10_000 });
    assert.equal(await page.locator("#verify-result").getAttribute("data-seq"), "3");
    assert.match((await page.locator("#verify-result").textContent()) ?? "", /seq 3 does not verify/);
    await screenshot("dashboard-tampered.png");
  });

  test("readable on a phone-sized screen (no horizontal page scroll)", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(300);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 1, `the page scrolls sideways by ${overflow}px on a phone`);
    await screenshot("dashboard-phone.png");
  });
});

describe('the dashboard on a daemon with reads = "token" and signed checkpoints', () => {
  const READ = "read-token-for-the-browser";
  const WRITE = "write-token-for-the-test";
  const secured = new TestDaemon(
    `
reads = "token"

[[ledgers]]
id = "main"
storage = "main.db"
checkpoint_key = "main.key"
checkpoint_origin = "ui.example/main"

[[ledgers.modules]]
use = "nucleus_fixture_mods:CrashOnCue"
`,
    { NUCLEUS_TOKEN: WRITE, NUCLEUS_READ_TOKEN: READ },
  );
  let tab: Page;
  const errors: string[] = [];

  before(async () => {
    await keygen("ui.example/main", join(secured.dir, "main.key"));
    await secured.start();
    for (let i = 0; i < 3; i++) await append(secured.url, "main", "n", { i }, {}, WRITE);
    tab = await context.newPage();
    tab.on("pageerror", (error) => errors.push(`pageerror: ${error.message}`));
  });
  after(async () => {
    await tab?.close();
    await secured.stop();
  });

  test("asks for the read token, then shows the ledger and follows the tail with it", async () => {
    await tab.goto(`${secured.url}/ui`); // the page itself is open; its data is not
    await tab.locator('#connection[data-state="unauthorized"]').waitFor({ timeout: 10_000 });
    await tab.locator("#token-form").waitFor({ state: "visible" });
    assert.equal(await tab.locator("#stat-length").textContent(), "–");
    await tab.locator("#token").fill(READ);
    await tab.locator('#token-form button[type="submit"]').click();
    await tab.locator("#connection[data-state=live]").waitFor({ timeout: 10_000 });
    await tab.locator("#token-form").waitFor({ state: "hidden" });
    await tab.locator('#modules tr[data-module="crasher"][data-state="running"]').waitFor();
    await tab.locator('#tail li[data-seq="2"]').waitFor();
    await tab.locator("#stat-checkpoint", { hasText: /^\d+ entries \(ui\.example\/main\)$/ }).waitFor();
    const receipt = await append(secured.url, "main", "with.token", { ok: true }, {}, WRITE);
    await tab.locator(`#tail li[data-seq="${receipt.seq}"]`).waitFor({ timeout: FAST });
    await tab.locator("#verify").click();
    await tab.locator('#verify-result[data-ok="true"]').waitFor({ timeout: 10_000 });
    // The token lasts for the tab's session: a reload does not ask again.
    await tab.reload();
    await tab.locator("#connection[data-state=live]").waitFor({ timeout: 10_000 });
    assert.equal(await tab.locator("#token-form").isHidden(), true);
    assert.deepEqual(errors, []);
  });
});
