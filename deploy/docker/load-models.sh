#!/usr/bin/env bash
# Registers every ONNX file of a directory in the inferq model registry, named after
# the file (`tutorial-rf.onnx` -> model `tutorial-rf`). Idempotent: a file whose sha256
# is already the model's default version is skipped, so running it again adds nothing;
# a changed file becomes the model's next version.
#
#   inferq-load-models [DIR]      # default DIR: /usr/share/inferq/demo-models
#
# The registry is INFERQ_MODELS (the image sets /models). Used by the compose stack's
# one-shot `models` service, the Kubernetes `inferq-load-models` Job and scripts/stack.sh.
set -euo pipefail

dir="${1:-/usr/share/inferq/demo-models}"
bin="${INFERQ_BIN:-inferq}"

shopt -s nullglob
files=("$dir"/*.onnx)
if [ "${#files[@]}" -eq 0 ]; then
  echo "inferq-load-models: no .onnx files in $dir" >&2
  exit 1
fi

for file in "${files[@]}"; do
  name="$(basename "$file" .onnx)"
  sum="$(sha256sum "$file" | cut -d' ' -f1)"
  # `models show NAME` prints the default version's manifest (exit 1: no such model).
  if current="$("$bin" models show "$name" 2>/dev/null)" &&
     grep -q "\"sha256\": \"$sum\"" <<<"$current"; then
    echo "inferq-load-models: $name is present (sha256 $sum), skipped"
    continue
  fi
  "$bin" models add "$file" --name "$name"
done
