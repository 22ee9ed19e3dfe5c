#!/usr/bin/env bash
# CI for clients/typescript: the @nucleus-actors/client tests and the dashboard's browser tests,
# against real daemons run by the Python venv given as $1 (or $VENV).
#   .ci/typescript.sh /path/to/venv
# Installs Debian's chromium if missing (apt-get), then `npm ci` from the committed lockfile,
# builds, checks the generated types and the committed dashboard build, runs both suites.
# Screenshots land in $NUCLEUS_ARTIFACTS (default clients/typescript/artifacts).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-${VENV:-}}"
if [[ -z "$VENV" || ! -x "$VENV/bin/python" ]]; then
    echo "usage: .ci/typescript.sh VENV (a venv with nucleus_actors[daemon] installed)" >&2
    exit 2
fi
export VENV
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "$CHROMIUM" ]]; then
    echo "== installing chromium (apt-get)"
    sudo_=""
    [[ "$(id -u)" == 0 ]] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq chromium >/dev/null
fi
export CHROMIUM

cd clients/typescript
echo "== npm ci"
npm ci --no-audit --no-fund --loglevel=error
echo "== build + typecheck"
npm run --silent build
npm run --silent typecheck
echo "== client tests (real daemon)"
npm test --silent
echo "== browser tests (chromium $("$CHROMIUM" --version 2>/dev/null | awk '{print $2}'))"
npm run --silent test:e2e
echo "== typescript ok"
