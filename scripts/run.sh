#!/usr/bin/env bash
# Runs inferq with the demo models:
#
#   bash scripts/run.sh [serve flags…]     e.g. bash scripts/run.sh --listen 0.0.0.0:8080
#
# 1. scripts/setup.sh (redis-server, ONNX Runtime, demo models in testdata/models);
# 2. a release build;
# 3. registers each demo model into the registry ($INFERQ_MODELS, default ./models)
#    unless a version with the same sha256 is already there (safe to run again);
# 4. execs `inferq serve "$@"`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
cargo build --release --locked --quiet

export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/lib/libonnxruntime.so}"
export INFERQ_MODELS="${INFERQ_MODELS:-$ROOT/models}"
BIN="$ROOT/target/release/inferq"
VPY="$ROOT/.venv/bin/python"

# `<name> <sha256>` of every registered version, one per line.
registered() {
  "$BIN" models list --json |
    "$VPY" -c 'import json, sys
for m in json.load(sys.stdin):
    for v in m["versions"]:
        print(m["name"] + "@" + str(v))' |
    while read -r ref; do
      "$BIN" models show "$ref" |
        "$VPY" -c 'import json, sys; m = json.load(sys.stdin); print(m["name"], m["sha256"])'
    done
}

have="$(registered)"
for file in testdata/models/*.onnx; do
  name="$(basename "$file" .onnx)"
  sum="$(sha256sum "$file" | cut -d' ' -f1)"
  if grep -qx "$name $sum" <<<"$have"; then
    continue
  fi
  # The reference file's dataset and accuracy become manifest metadata.
  mapfile -t meta < <("$VPY" -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("dataset=" + str(r["dataset"]))
print("accuracy=" + str(r["accuracy"]))' "testdata/models/$name.reference.json")
  "$BIN" models add "$file" --name "$name" --meta "${meta[0]}" --meta "${meta[1]}"
done

exec "$BIN" serve "$@"
