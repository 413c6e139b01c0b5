#!/usr/bin/env bash
# Throughput of the native stack (scripts/stack.sh) with 1 and with 2 worker processes,
# measured with `inferq bench` (closed loop), appended to bench/RESULTS.md under
# "Native stack scaling" with the machine line.
#
#   bash bench/stack_scaling.sh            # DURATION_S=15 by default
#
# Cases (closed loop): tutorial-rf, a small random forest, one row per job, 64 jobs out
# (light inference: Redis, the client and the per-job overhead weigh in), as a direct
# Redis producer and through the gateway (HTTP, sync route); heavy-mlp, a large MLP,
# 32 rows per job, 64 jobs out (inference dominates), as a direct Redis producer.
# Prometheus is left out (STACK_PROMETHEUS=0) so that it takes no CPU from the run.
# Raw JSON per run: bench/out/stack-scaling/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DURATION="${DURATION_S:-15}"
OUT="$ROOT/bench/out/stack-scaling"
mkdir -p "$OUT"

cargo build --release --locked --quiet
BIN="$ROOT/target/release/inferq"
export STACK_BIN="$BIN" STACK_PROMETHEUS=0
# Free loopback ports: the gateway's, and three in a row for the metrics listeners.
read -r gateway_port metrics_port < <(python3 - <<'PY'
import socket
def free(p=0):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return s.getsockname()[1]
    except OSError:
        return None
    finally:
        s.close()
while True:
    base = free()
    if base < 65000 and all(free(base + i) for i in (1, 2)):
        print(free(), base)
        break
PY
)
export STACK_GATEWAY_ADDR="${STACK_GATEWAY_ADDR:-127.0.0.1:$gateway_port}"
export STACK_METRICS_PORT="${STACK_METRICS_PORT:-$metrics_port}"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/lib/libonnxruntime.so}"

# model, via, rows per job, concurrency
cases=("tutorial-rf redis 1 64" "tutorial-rf http 1 64" "heavy-mlp redis 32 64")

# CPU seconds (user + system) a process has used so far.
cpu_s() {
  awk -v hz="$(getconf CLK_TCK)" '{ split($0, a, ") "); split(a[2], f, " "); print (f[12] + f[13]) / hz }' "/proc/$1/stat"
}
# `name=seconds` for every process of the stack.
stack_cpu() {
  local f
  for f in "$STACK_DIR"/*.pid; do
    printf '%s=%s ' "$(basename "$f" .pid)" "$(cpu_s "$(cat "$f")")"
  done
}
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for workers in 1 2; do
  export STACK_WORKERS="$workers" STACK_DIR="$OUT/w$workers"
  rm -rf "$STACK_DIR"
  bash scripts/stack.sh up >/dev/null
  trap 'bash scripts/stack.sh down >/dev/null' EXIT
  for c in "${cases[@]}"; do
    read -r model via rows conc <<<"$c"
    echo "bench: $workers worker(s), $model via $via, $rows row(s)/job, ${DURATION}s at concurrency $conc" >&2
    before="$(stack_cpu)"
    "$BIN" bench "$model" --via "$via" --http-mode sync \
      --models "$STACK_DIR/models" --redis-url "redis+unix://$STACK_DIR/redis.sock" \
      --url "http://$STACK_GATEWAY_ADDR" --concurrency "$conc" --rows-per-job "$rows" \
      --warmup-s 2 --duration-s "$DURATION" --json >"$OUT/w$workers-$model-$via.json"
    # CPU each stack process used during the run (warm-up and drain included).
    printf '%s\n%s\n' "$before" "$(stack_cpu)" >"$OUT/w$workers-$model-$via.cpu"
  done
  bash scripts/stack.sh down >/dev/null
  trap - EXIT
done

load_after="$(cut -d' ' -f1-3 /proc/loadavg)"
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' + uncommitted changes')"
table="$(python3 - "$OUT" "$DURATION" "$machine" "$load_before" "$load_after" <<'PY'
import json, sys
out, duration, machine, load_before, load_after = sys.argv[1:]
def load(w, model, via):
    with open(f"{out}/w{w}-{model}-{via}.json") as f:
        return json.load(f)
def cpu(w, model, via, seconds):
    """Cores used on average by the workers together and by Redis and the gateway."""
    with open(f"{out}/w{w}-{model}-{via}.cpu") as f:
        before, after = [dict(kv.split("=") for kv in line.split()) for line in f.read().splitlines()]
    used = {k: float(after[k]) - float(before[k]) for k in before if k in after}
    workers = sum(v for k, v in used.items() if k.startswith("worker-"))
    return workers / seconds, used.get("redis", 0) / seconds, used.get("gateway", 0) / seconds
print("## Native stack scaling")
print()
print(f"Machine: {machine}. Load average (1, 5, 15 min) before: {load_before}; after: {load_after}")
print("(anything above ~0 before the run is other work on the machine, which skews the figures).")
print()
print(f"`bash bench/stack_scaling.sh`: `scripts/stack.sh` (Redis with AOF `appendfsync always`,")
print(f"one gateway, N worker processes, release build, defaults: `INFERQ_INFER_THREADS=1`,")
print(f"`INFERQ_INTRA_THREADS=1`, `INFERQ_MAX_BATCH=64`), loaded by `inferq bench` in a closed")
print(f"loop, {duration} s measured after 2 s of warm-up.")
print(f"Load generator, Redis, gateway and workers all share the same cores.")
print()
print("CPU columns: cores used on average during the run (warm-up, measured window and drain:")
print(f"CPU seconds / {int(duration) + 2} s) by all worker processes together, by Redis and by the gateway.")
print()
print("| model | via | rows/job | jobs out | workers | jobs/s | rows/s | p50 ms | p95 ms | p99 ms | errors | speed-up | workers CPU | Redis CPU | gateway CPU |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for model, via in [("tutorial-rf", "redis"), ("tutorial-rf", "http"), ("heavy-mlp", "redis")]:
    base = None
    for w in (1, 2):
        r = load(w, model, via)
        lat = r["latency_ms"]
        errors = sum(r.get("errors", {}).values()) if isinstance(r.get("errors"), dict) else r.get("errors")
        speed = "" if base is None else f"{r['rows_per_s'] / base:.2f}x"
        base = base or r["rows_per_s"]
        wc, rc, gc = cpu(w, model, via, int(duration) + 2)
        print(f"| {model} | {r['via']} | {r['rows_per_job']} | {r['concurrency']} | {w} | {r['jobs_per_s']:.0f} | {r['rows_per_s']:.0f} | {lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | {errors} | {speed} | {wc:.2f} | {rc:.2f} | {gc:.2f} |")
PY
)"
[ -f "$ROOT/bench/RESULTS.md" ] || printf '# inferq benchmark results\n' >"$ROOT/bench/RESULTS.md"
printf '\n%s\n' "$table" >>"$ROOT/bench/RESULTS.md"
printf '%s\n' "$table"
