#!/usr/bin/env bash
# The docker-compose topology, natively on loopback, without Docker: a redis-server
# (AOF with appendfsync always, noeviction) on a unix socket, one `inferq gateway`,
# N `inferq worker` processes (default 2) and a Prometheus scraping all of them.
#
#   bash scripts/stack.sh up        # start everything, wait until each is ready
#   bash scripts/stack.sh status    # one line per process: pid, state, address, health
#   bash scripts/stack.sh down      # SIGTERM all (workers drain), then SIGKILL leftovers
#
# State lives in $STACK_DIR (default ./.stack): <name>.pid and <name>.log per process,
# redis/ (AOF), models/ (the registry, with the demo models), prometheus.yml and
# prometheus-data/. `down` keeps the directory (logs, AOF); delete it to start afresh.
#
# Settings (environment):
#   STACK_DIR             state directory (default: <repo>/.stack; keep it short: the
#                         Redis socket path must fit in 100 bytes)
#   STACK_BIN             the inferq binary (default: target/release/inferq, built first)
#   STACK_WORKERS         worker processes (default 2)
#   STACK_GATEWAY_ADDR    gateway HTTP address (default 127.0.0.1:8080)
#   STACK_METRICS_PORT    gateway metrics port; worker i gets port + i (default 9464)
#   STACK_PROMETHEUS_ADDR Prometheus address (default 127.0.0.1:9090)
#   STACK_PROMETHEUS      1 (default) to run Prometheus, 0 to leave it out
#   STACK_MODELS_DIR      ONNX files registered at `up` (default testdata/models)
#   STACK_REDIS_MAXMEMORY Redis maxmemory (default 1gb; noeviction acts only under one)
#   STACK_STOP_TIMEOUT_S  how long `down` waits after SIGTERM before SIGKILL (default:
#                         the drain deadline INFERQ_DRAIN_TIMEOUT_MS + 10 s)
#   INFERQ_*              passed to every inferq process (e.g. INFERQ_CLAIM_AFTER_MS);
#                         listen addresses, registry and Redis URL are set by the script
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${STACK_DIR:-$ROOT/.stack}"
WORKERS="${STACK_WORKERS:-2}"
GATEWAY_ADDR="${STACK_GATEWAY_ADDR:-127.0.0.1:8080}"
METRICS_PORT="${STACK_METRICS_PORT:-9464}"
PROM_ADDR="${STACK_PROMETHEUS_ADDR:-127.0.0.1:9090}"
PROM="${STACK_PROMETHEUS:-1}"
MODELS_SRC="${STACK_MODELS_DIR:-$ROOT/testdata/models}"
REDIS_MAXMEMORY="${STACK_REDIS_MAXMEMORY:-1gb}"
HEALTH="$ROOT/deploy/docker/healthcheck.sh"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$ROOT/.ort/lib/libonnxruntime.so}"

say() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }


# Names with a pid file, whatever STACK_WORKERS says now (for down/status).
recorded() {
  local f
  for f in redis gateway; do [ -f "$DIR/$f.pid" ] && echo "$f"; done
  for f in "$DIR"/worker-*.pid; do [ -f "$f" ] && basename "$f" .pid; done
  [ -f "$DIR/prometheus.pid" ] && echo prometheus
  return 0
}

# True when the pid in <name>.pid is alive and is the process we started (not a
# recycled pid): its command line names the program and, for inferq, this STACK_DIR.
alive() {
  local name="$1" pid cmd
  pid="$(cat "$DIR/$name.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  case "$name" in
    redis) [[ "$cmd" == *redis-server* ]] ;;
    prometheus) [[ "$cmd" == *prometheus* && "$cmd" == *"$DIR"* ]] ;;
    *) [[ "$cmd" == *inferq* && "$cmd" == *"$DIR"* ]] ;;
  esac
}

metrics_port() {
  case "$1" in
    gateway) echo "$METRICS_PORT" ;;
    worker-*) echo $((METRICS_PORT + ${1#worker-})) ;;
  esac
}

address() {
  case "$1" in
    redis) echo "redis+unix://$DIR/redis.sock" ;;
    gateway) echo "http://$GATEWAY_ADDR (metrics 127.0.0.1:$(metrics_port gateway))" ;;
    worker-*) echo "metrics 127.0.0.1:$(metrics_port "$1")" ;;
    prometheus) echo "http://$PROM_ADDR" ;;
  esac
}

healthy() {
  case "$1" in
    redis) redis-cli -s "$DIR/redis.sock" ping 2>/dev/null | grep -q PONG ;;
    prometheus) bash "$HEALTH" "${PROM_ADDR##*:}" /-/ready 2>/dev/null ;;
    *) bash "$HEALTH" "$(metrics_port "$1")" /v2/health/ready 2>/dev/null ;;
  esac
}

# Starts one process in the background with all of its output in <name>.log.
launch() {
  local name="$1"; shift
  "$@" </dev/null >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

wait_ready() {
  local name="$1" deadline=$((SECONDS + 60))
  # Ready means: our process runs and its port answers (another process answering on
  # a port ours failed to bind is not ours being ready).
  until healthy "$name" && alive "$name"; do
    if ! alive "$name"; then
      printf 'stack: %s exited during start; the end of %s:\n' "$name" "$DIR/$name.log" >&2
      tail -n 20 "$DIR/$name.log" >&2 || true
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      printf 'stack: %s not ready after 60 s; the end of %s:\n' "$name" "$DIR/$name.log" >&2
      tail -n 20 "$DIR/$name.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

prometheus_config() {
  local targets="" i rules=""
  for ((i = 1; i <= WORKERS; i++)); do
    targets+="          - 127.0.0.1:$(metrics_port "worker-$i")"$'\n'
  done
  if [ -f "$ROOT/prometheus/alerts.yml" ]; then
    rules="rule_files:"$'\n'"  - $ROOT/prometheus/alerts.yml"$'\n'
  fi
  cat <<EOF
# Generated by scripts/stack.sh: the scrape jobs of the compose stack's
# prometheus.yml (same job names), with loopback targets.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
${rules}scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets:
          - $PROM_ADDR
  - job_name: inferq-gateway
    static_configs:
      - targets:
          - 127.0.0.1:$(metrics_port gateway)
  - job_name: inferq-worker
    static_configs:
      - targets:
EOF
  printf '%s' "$targets"
}

up() {
  mkdir -p "$DIR"
  DIR="$(cd "$DIR" && pwd)"
  [ "${#DIR}" -le 88 ] || die "STACK_DIR $DIR is too long for a unix socket path; use a shorter one"
  local n
  for n in $(recorded); do
    if alive "$n"; then die "$n is already running (pid $(cat "$DIR/$n.pid")): run \`$0 down\` first"; fi
    rm -f "$DIR/$n.pid"
  done
  command -v redis-server >/dev/null || die "redis-server is missing: run scripts/setup.sh"
  if [ "$PROM" = 1 ]; then command -v prometheus >/dev/null || die "prometheus is missing: run scripts/setup.sh (or STACK_PROMETHEUS=0)"; fi
  [ -f "$ORT_DYLIB_PATH" ] || die "ONNX Runtime ($ORT_DYLIB_PATH) is missing: run scripts/setup.sh"
  local bin="${STACK_BIN:-}"
  if [ -z "$bin" ]; then
    (cd "$ROOT" && cargo build --release --locked --quiet)
    bin="$ROOT/target/release/inferq"
  fi
  [ -x "$bin" ] || die "inferq binary $bin is missing"

  # Registry: the demo models (idempotent).
  INFERQ_BIN="$bin" INFERQ_MODELS="$DIR/models" bash "$ROOT/deploy/docker/load-models.sh" "$MODELS_SRC" \
    >"$DIR/models.log" 2>&1 || { cat "$DIR/models.log" >&2; die "registering the models failed"; }

  # Whatever makes `up` fail from here on (a process that does not come up, a script
  # error), stop what was started: `up` never leaves half a stack behind.
  trap 'if [ $? -ne 0 ]; then say "start failed; stopping what started"; down >/dev/null 2>&1 || true; fi' EXIT

  mkdir -p "$DIR/redis"
  launch redis redis-server --port 0 --unixsocket "$DIR/redis.sock" --unixsocketperm 700 \
    --dir "$DIR/redis" --appendonly yes --appendfsync always \
    --maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy noeviction \
    --save "" --daemonize no --logfile ""
  wait_ready redis

  local url="redis+unix://$DIR/redis.sock"
  local common=(--models "$DIR/models" --redis-url "$url")
  launch gateway "$bin" "${common[@]}" --listen "$GATEWAY_ADDR" \
    --metrics-listen "127.0.0.1:$(metrics_port gateway)" gateway
  local i
  for ((i = 1; i <= WORKERS; i++)); do
    launch "worker-$i" env INFERQ_CONSUMER="stack-worker-$i" "$bin" "${common[@]}" \
      --metrics-listen "127.0.0.1:$(metrics_port "worker-$i")" worker
  done
  wait_ready gateway
  for ((i = 1; i <= WORKERS; i++)); do wait_ready "worker-$i"; done

  if [ "$PROM" = 1 ]; then
    prometheus_config >"$DIR/prometheus.yml"
    launch prometheus prometheus --config.file="$DIR/prometheus.yml" \
      --storage.tsdb.path="$DIR/prometheus-data" --web.listen-address="$PROM_ADDR"
    wait_ready prometheus
  fi
  trap - EXIT
  status
  say "up: API http://$GATEWAY_ADDR/v2  (stop with: $0 down)"
}

down() {
  [ -d "$DIR" ] || { say "nothing to stop ($DIR does not exist)"; return 0; }
  DIR="$(cd "$DIR" && pwd)"
  local procs=() n pid
  mapfile -t procs < <(recorded)
  # Clients first (workers drain and ack), Redis last.
  local order=()
  for n in "${procs[@]}"; do [ "$n" != redis ] && order+=("$n"); done
  for n in "${procs[@]}"; do [ "$n" = redis ] && order+=("$n"); done

  local drain_ms="${INFERQ_DRAIN_TIMEOUT_MS:-30000}"
  local timeout="${STACK_STOP_TIMEOUT_S:-$((drain_ms / 1000 + 10))}"
  local phase
  for phase in clients redis; do
    local stopping=()
    for n in "${order[@]}"; do
      if [ "$phase" = clients ] && [ "$n" = redis ]; then continue; fi
      if [ "$phase" = redis ] && [ "$n" != redis ]; then continue; fi
      if alive "$n"; then
        kill -TERM "$(cat "$DIR/$n.pid")" 2>/dev/null || true
        stopping+=("$n")
      fi
    done
    local deadline=$((SECONDS + timeout))
    for n in "${stopping[@]}"; do
      while alive "$n" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
      if alive "$n"; then
        pid="$(cat "$DIR/$n.pid")"
        say "$n (pid $pid) still running after ${timeout}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while alive "$n"; do sleep 0.05; done
      fi
      say "stopped $n"
    done
  done
  for n in "${procs[@]}"; do rm -f "$DIR/$n.pid"; done
  rm -f "$DIR/redis.sock"
  say "down"
}

status() {
  [ -d "$DIR" ] || { say "not started ($DIR does not exist)"; return 0; }
  DIR="$(cd "$DIR" && pwd)"
  local n any=0
  printf '%-12s %-8s %-8s %-9s %s\n' NAME PID STATE HEALTH ADDRESS
  for n in $(recorded); do
    any=1
    local pid state health
    pid="$(cat "$DIR/$n.pid" 2>/dev/null || echo -)"
    if alive "$n"; then
      state=running
      if healthy "$n"; then health=ready; else health=unready; fi
    else
      state=dead
      health=-
    fi
    printf '%-12s %-8s %-8s %-9s %s\n' "$n" "$pid" "$state" "$health" "$(address "$n")"
  done
  [ "$any" = 1 ] || say "nothing running (no pid files in $DIR)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
