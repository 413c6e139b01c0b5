#!/usr/bin/env bash
# One command for the whole comparison (issue #7): set-up if needed, release build, then
# bench/compare.py, which prints one table and appends the run to bench/RESULTS.md, and
# bench/shapes.py (variable-shape batching policies on a sequence encoder), likewise.
#
#   bash bench/run.sh              # the full run (a few minutes on 2 cores)
#   bash bench/run.sh --quick      # a smoke run: short windows, nothing appended
#   bash bench/run.sh --profile    # also: where a one-row job's time goes (perf, needs root)
#
# Each system gets its own private redis-server; everything started is stopped at the
# end. Run it on a quiet machine: other load on the two cores moves every figure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

profile=0
args=()
for a in "$@"; do
  if [ "$a" = "--profile" ]; then profile=1; else args+=("$a"); fi
done

bash scripts/setup.sh
cargo build --release --locked --quiet --bin inferq
.venv/bin/python bench/compare.py "${args[@]+"${args[@]}"}"
# Variable-shape batching (issue #11): about 20 s.
if [[ " ${args[*]-} " == *" --quick "* ]]; then
  .venv/bin/python bench/shapes.py --jobs 2000 --no-append
else
  .venv/bin/python bench/shapes.py
fi
if [ "$profile" = 1 ]; then
  .venv/bin/python bench/profile.py
fi
