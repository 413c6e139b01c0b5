#!/usr/bin/env bash
# Installs the offline validators that tests/deploy_manifests.rs runs, into
# .tools/deploy-validate/ (git-ignored). Idempotent and quiet when up to date;
# scripts/setup.sh calls it.
#
#   venv/          kubernetes-validate (Kubernetes JSON schemas, strict) + PyYAML
#   node_modules/  @kubernetes-models/keda (schemas of KEDA's ScaledObject and
#                  TriggerAuthentication, generated from KEDA's Go API types) and
#                  dockerfile-utils (the Dockerfile linter of the Docker language server)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DEST="$ROOT/.tools/deploy-validate"
mkdir -p "$DEST"

say() { printf 'setup: %s\n' "$*"; }

# ---------------------------------------------------------------- python
req_sum="$(sha256sum "$HERE/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$DEST/venv/bin/kubernetes-validate" ] || [ "$(cat "$DEST/venv/.stamp" 2>/dev/null)" != "$req_sum" ]; then
  rm -rf "$DEST/venv"
  python3 -m venv "$DEST/venv"
  "$DEST/venv/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt"
  echo "$req_sum" > "$DEST/venv/.stamp"
  say "installed kubernetes-validate into .tools/deploy-validate/venv"
fi

# ---------------------------------------------------------------- node
if ! command -v npm >/dev/null 2>&1; then
  echo "setup: npm is missing (apt-get install npm), needed for the KEDA and Dockerfile validators" >&2
  exit 1
fi
lock_sum="$(cat "$HERE/package.json" "$HERE/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [ ! -d "$DEST/node_modules/@kubernetes-models/keda" ] || [ "$(cat "$DEST/.npm-stamp" 2>/dev/null)" != "$lock_sum" ]; then
  cp "$HERE/package.json" "$HERE/package-lock.json" "$DEST/"
  (cd "$DEST" && npm ci --silent --no-audit --no-fund >/dev/null 2>&1) || {
    (cd "$DEST" && npm ci --no-audit --no-fund) >&2
    echo "setup: npm ci for the deploy validators failed" >&2
    exit 1
  }
  echo "$lock_sum" > "$DEST/.npm-stamp"
  say "installed @kubernetes-models/keda and dockerfile-utils into .tools/deploy-validate"
fi
