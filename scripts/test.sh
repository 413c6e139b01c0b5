#!/usr/bin/env bash
# THE test command: set-up, formatting, lints, then the whole test suite.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh --test registry # extra arguments go to the test runner
#
# Tests run with cargo-nextest when it is installed (each test in its own process),
# else with `cargo test`. Works from any cwd.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

step() { printf '\n==> %s\n' "$*"; }

step "set-up (scripts/setup.sh)"
bash scripts/setup.sh
# Child processes (the inferq binary under test) find ONNX Runtime through this.
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/lib/libonnxruntime.so}"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

if cargo nextest --version >/dev/null 2>&1; then
  step "cargo nextest run"
  # nextest does not run doc tests; the crate has none (examples are run as tests).
  cargo nextest run --locked --no-fail-fast "$@"
else
  step "cargo test (cargo-nextest is not installed)"
  cargo test --locked --no-fail-fast "$@"
fi
