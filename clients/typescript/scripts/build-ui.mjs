// Build the dashboard into nucleus_actors/daemon/dashboard (or $NUCLEUS_UI_OUT) and stamp it
// with the digest of its sources, which tests/daemon/test_events_ui.py recomputes: the
// committed build fails that test when the sources change without a rebuild.
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join, relative, sep } from "node:path";
import { build } from "vite";
import { PACKAGE_ROOT } from "./python.mjs";

function files(dir, keep) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? files(path, keep) : keep(path) ? [path] : [];
  });
}

export function sourceDigest() {
  const sources = [
    ...files(join(PACKAGE_ROOT, "dashboard"), () => true),
    // The generated API types are erased by the build: regenerating them needs no rebuild.
    ...files(join(PACKAGE_ROOT, "src"), (p) => p.endsWith(".ts") && !p.includes(`${sep}generated${sep}`)),
    join(PACKAGE_ROOT, "package-lock.json"),
    join(PACKAGE_ROOT, "vite.config.ts"),
  ]
    .map((path) => relative(PACKAGE_ROOT, path).split(sep).join("/"))
    .sort();
  const digest = createHash("sha256");
  for (const name of sources) {
    digest.update(Buffer.concat([Buffer.from(name + "\0"), readFileSync(join(PACKAGE_ROOT, name)), Buffer.from("\0")]));
  }
  return digest.digest("hex");
}

const outDir = process.env.NUCLEUS_UI_OUT ?? join(PACKAGE_ROOT, "..", "..", "nucleus_actors", "daemon", "dashboard");
await build({ configFile: join(PACKAGE_ROOT, "vite.config.ts"), build: { outDir } });
writeFileSync(join(outDir, "source.sha256"), sourceDigest() + "\n");
console.log(`built the dashboard into ${outDir}`);
