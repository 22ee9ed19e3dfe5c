// Which Python runs the daemon for the scripts and tests: $NUCLEUS_PYTHON, else $VENV/bin/python,
// else python3 from PATH. The repository root goes first on PYTHONPATH so that this checkout's
// nucleus_actors (and tests.daemon.testmods) is the one imported.
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const REPO_ROOT = resolve(PACKAGE_ROOT, "..", "..");

export function python() {
  if (process.env.NUCLEUS_PYTHON) return process.env.NUCLEUS_PYTHON;
  if (process.env.VENV) return join(process.env.VENV, "bin", "python");
  return "python3";
}

export function pythonEnv(extra = {}) {
  const env = { ...process.env, ...extra };
  delete env.NUCLEUS_TOKEN;
  env.PYTHONPATH = [REPO_ROOT, process.env.PYTHONPATH].filter(Boolean).join(":");
  return env;
}
