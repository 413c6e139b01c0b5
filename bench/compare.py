#!/usr/bin/env python3
"""One comparison run: inferq against what a Python team would otherwise deploy, on the
same models and the same machine, in one go. Run through bench/run.sh (it sets up the
venv and builds the release binary); prints one table and appends the run, with the
machine line, to bench/RESULTS.md.

Systems, each on its own private redis-server (unix socket, no persistence):
  ceiling      ONNX Runtime in-process (Rust, inferq's session settings, one thread)
  inferq       2 `inferq worker` processes x 1 inference thread; through Redis (driven by
               `inferq bench`) and through HTTP (`inferq gateway` + the same workers)
  py-streams   bench/py_streams_worker.py, 2 processes (XREADGROUP COUNT 32, onnxruntime)
  celery       bench/celery_app.py: Celery + celery-batches, concurrency 2, Python producer
  flask        bench/flask_app.py: the tutorial's threaded Flask app + joblib RandomForest

Drain mode (capacity): workers warmed up, stopped (SIGSTOP), the queue filled with
`inferq bench --fill`, then `inferq bench --drain-wait` times the workers alone, with their
CPU time from /proc. End to end: `inferq bench` as the producer for inferq and for the
Python worker alike (same protocol, same reply lists).

Every run is bounded in count and time; the whole script takes a few minutes.
"""

import argparse
import collections
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"
BIN = ROOT / "target" / "release" / "inferq"
MODELS = ROOT / "testdata" / "models"
RESULTS = BENCH / "RESULTS.md"
ORT_LIB = ROOT / ".ort" / "lib" / "libonnxruntime.so"
PY = sys.executable

CHEAP, DIGITS, HEAVY = "tutorial-rf", "digits-mlp", "heavy-mlp"
STARTED = []  # every process this script started, to stop them on the way out
WINDOW = {"warmup": 1.0, "duration": 5.0}  # seconds per load run (--quick shortens them)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd, env=None, log_name=None, cwd=None):
    out = open(OUT / f"{log_name}.log", "w") if log_name else subprocess.DEVNULL
    p = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=out,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    STARTED.append(p)
    return p


def stop(procs, sig=signal.SIGTERM, timeout=15):
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGCONT)
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all(*_):
    stop([p for p in STARTED if p.poll() is None], timeout=5)


def wait_for(what, check, timeout=30.0):
    until = time.time() + timeout
    while time.time() < until:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def http_get(port, path, timeout=2.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Redis:
    """A private redis-server on a unix socket in its own temporary directory."""

    def __init__(self, name):
        self.dir = tempfile.mkdtemp(prefix=f"iqb-{name}-", dir="/tmp")
        self.sock = f"{self.dir}/redis.sock"
        self.proc = spawn(["redis-server", "--port", "0", "--unixsocket", self.sock,
                           "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                           "--dir", self.dir, "--logfile", f"{self.dir}/redis.log"])
        import redis

        self.client = redis.Redis(unix_socket_path=self.sock)
        wait_for("redis", lambda: self.client.ping())

    url = property(lambda self: f"redis+unix://{self.sock}")  # inferq
    py_url = property(lambda self: f"unix://{self.sock}")  # redis-py
    celery_url = property(lambda self: f"redis+socket://{self.sock}")  # kombu / celery

    def close(self):
        stop([self.proc])
        shutil.rmtree(self.dir, ignore_errors=True)


def inferq_env(redis=None, registry=None, **settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERQ_")}
    env.update(ORT_DYLIB_PATH=str(ORT_LIB), RUST_LOG="warn")
    if redis:
        env["INFERQ_REDIS_URL"] = redis.url
    if registry:
        env["INFERQ_MODELS"] = str(registry)
    env.update({f"INFERQ_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def inferq_bench(redis, model, *args, timeout=120):
    """`inferq bench MODEL ARGS --json` -> parsed JSON (a failed run still reports)."""
    cmd = [str(BIN), "bench", model, "--reference", str(MODELS / f"{model}.reference.json"),
           "--json", *map(str, args)]
    r = subprocess.run(cmd, env=inferq_env(redis), capture_output=True, text=True,
                       timeout=timeout)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


class Workers:
    """N worker processes of one kind (`inferq` or `py`) serving one model."""

    def __init__(self, kind, redis, model, n=2, registry=None, max_batch=64, infer_threads=1):
        self.kind, self.redis, self.model, self.procs, self.metrics = kind, redis, model, [], []
        for i in range(n):
            name = f"{kind}-{model}-w{i}"
            if kind == "inferq":
                port = free_port()
                env = inferq_env(redis, registry, serve_models=model, consumer=f"w{i}",
                                 metrics_listen=f"127.0.0.1:{port}", max_batch=max_batch,
                                 infer_threads=infer_threads, intra_threads=1)
                self.procs.append(spawn([BIN, "worker"], env=env, log_name=name))
                self.metrics.append(f"http://127.0.0.1:{port}/metrics")
                wait_for(f"{name} metrics", lambda: http_get(port, "/metrics")[0] == 200)
            else:
                self.procs.append(spawn(
                    [PY, BENCH / "py_streams_worker.py", "--redis-url", redis.py_url,
                     "--model", model, "--model-file", MODELS / f"{model}.onnx",
                     "--consumer", f"py{i}", "--count", "32"], log_name=name))
        # Warm-up (loads the model in every process) and a first correctness check.
        r = inferq_bench(redis, model, "--max-jobs", 400, "--concurrency", 16, "--warmup-s", 0,
                         "--duration-s", 30)
        if r["ok"] != 400:
            raise RuntimeError(f"{kind} warm-up on {model}: {r}")

    pids = property(lambda self: [p.pid for p in self.procs])

    def signal(self, sig):
        for p in self.procs:
            p.send_signal(sig)

    def close(self):
        stop(self.procs)


def proc_cpu_s(pid):
    """User + system CPU seconds of a process (/proc/<pid>/stat)."""
    f = Path(f"/proc/{pid}/stat").read_text()
    f = f[f.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def drain(redis, workers, n):
    """Stop the warmed-up workers, fill n jobs, time the workers alone draining them."""
    workers.signal(signal.SIGSTOP)
    time.sleep(0.2)
    filled = inferq_bench(redis, workers.model, "--fill", n)
    cmd = [BIN, "bench", workers.model, "--drain-wait", "--json", "--duration-s", 120,
           "--reference", MODELS / f"{workers.model}.reference.json",
           "--pids", ",".join(map(str, workers.pids))]
    p = subprocess.Popen([str(c) for c in cmd], env=inferq_env(redis), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    cue = p.stderr.readline()
    if "start the workers" not in cue:
        raise RuntimeError(f"drain-wait: {cue}{p.stderr.read()}")
    redis_cpu = proc_cpu_s(redis.proc.pid)
    workers.signal(signal.SIGCONT)
    out, err = p.communicate(timeout=180)
    d = json.loads(out.strip())
    d["fill_jobs_per_s"] = filled["jobs_per_s"]
    # Redis was idle before and after: its CPU over the same span (10 ms ticks).
    d["redis_cpu_us_per_job"] = (proc_cpu_s(redis.proc.pid) - redis_cpu) * 1e6 / max(d["jobs"], 1)
    if not d["complete"]:
        raise RuntimeError(f"{workers.kind} did not drain: {d} {err}")
    return d


def server_counts(workers):
    """inferq's own counts across its worker processes: succeeded jobs and duplicates."""
    ok = dup = 0.0
    for url in workers.metrics:
        port = int(url.split(":")[2].split("/")[0])
        text = http_get(port, "/metrics")[1].decode()
        for line in text.splitlines():
            if f'model="{workers.model}"' not in line:
                continue
            if line.startswith("inferq_jobs_finished_total{") and 'status="succeeded"' in line:
                ok += float(line.rsplit(" ", 1)[1])
            elif line.startswith("inferq_duplicate_deliveries_total{"):
                dup += float(line.rsplit(" ", 1)[1])
    return ok, dup


def e2e(redis, model, metrics=(), via="redis", extra=(), **load):
    """One `inferq bench` load run (closed loop: concurrency=…; open loop: rate=…)."""
    args = ["--via", via, "--warmup-s", WINDOW["warmup"], "--duration-s", WINDOW["duration"],
            "--timeout-s", 15, *extra]
    if "rate" in load:
        args += ["--rate", round(load["rate"], 1), "--arrivals", "poisson"]
    else:
        args += ["--concurrency", load["concurrency"]]
    if metrics:
        args += ["--metrics-url", ",".join(metrics)]
    return inferq_bench(redis, model, *args)


# ------------------------------------------------------------------------- systems

def run_ceiling(models):
    out = {}
    for m in models:
        sizes = "1,8,32,128,512"
        cmd = [BIN, "bench", "--ceiling", MODELS / f"{m}.onnx", "--batch-sizes", sizes,
               "--duration-s", 1, "--reference", MODELS / f"{m}.reference.json", "--json"]
        r = subprocess.run([str(c) for c in cmd], env=inferq_env(), capture_output=True,
                           text=True, timeout=120, check=True)
        out[m] = {row["batch"]: row["rows_per_s"] for row in json.loads(r.stdout)}
        log(f"ceiling {m}: " + ", ".join(f"b{b} {v:,.0f}" for b, v in out[m].items()))
    return out


def redis_system(kind, model, registry, drain_jobs, full=True, n=2, max_batch=64,
                 concurrency=256):
    """Drain + saturation (+ 50% and 200 jobs/s when `full`) for one worker kind."""
    redis = Redis(f"{kind}-{model}")
    res = {}
    try:
        w = Workers(kind, redis, model, n=n, registry=registry, max_batch=max_batch)
        try:
            if drain_jobs:
                res["drain"] = drain(redis, w, drain_jobs)
                log(f"{kind} {model} drain: {res['drain']['jobs_per_s']:,.0f} jobs/s, "
                    f"{res['drain'].get('cpu_us_per_job') or 0:.1f} µs CPU/job")
            res["sat"] = e2e(redis, model, w.metrics, concurrency=concurrency)
            log(f"{kind} {model} saturation: {res['sat']['jobs_per_s']:,.0f} jobs/s "
                f"p95 {res['sat']['latency_ms']['p95']:.2f} ms, errors {res['sat']['errors']}")
            if full:
                half = max(res["sat"]["jobs_per_s"] / 2, 1.0)
                res["half"] = e2e(redis, model, w.metrics, rate=half)
                res["r200"] = e2e(redis, model, w.metrics, rate=200)
                log(f"{kind} {model} 50%: p95 {res['half']['latency_ms']['p95']:.2f} ms; "
                    f"200/s: p95 {res['r200']['latency_ms']['p95']:.2f} ms")
            if kind == "inferq":
                res["server_ok"], res["server_dup"] = server_counts(w)
        finally:
            w.close()
    finally:
        redis.close()
    return res


def http_system(model, registry):
    redis = Redis(f"http-{model}")
    res = {}
    try:
        w = Workers("inferq", redis, model, registry=registry)
        port, mport = free_port(), free_port()
        gw = spawn([BIN, "gateway"], log_name="gateway",
                   env=inferq_env(redis, registry, listen=f"127.0.0.1:{port}",
                                  metrics_listen=f"127.0.0.1:{mport}"))
        try:
            wait_for("gateway", lambda: http_get(port, "/v2/health/ready")[0] == 200)
            url = ["--url", f"http://127.0.0.1:{port}"]
            res["sat"] = e2e(redis, model, w.metrics, via="http", extra=url, concurrency=64)
            half = max(res["sat"]["jobs_per_s"] / 2, 1.0)
            res["half"] = e2e(redis, model, w.metrics, via="http", extra=url, rate=half)
            log(f"http {model}: {res['sat']['jobs_per_s']:,.0f} jobs/s; 50%: p95 "
                f"{res['half']['latency_ms']['p95']:.2f} ms")
        finally:
            stop([gw])
            w.close()
    finally:
        redis.close()
    return res


def reference_rows(model):
    ref = json.loads((MODELS / f"{model}.reference.json").read_text())
    x = ref["inputs"][0]
    cols = x["shape"][1]
    rows = [x["data"][i * cols:(i + 1) * cols] for i in range(x["shape"][0])]
    labels = ref["outputs"][0]["data"]
    return rows, labels


def percentile(sorted_ms, q):
    if not sorted_ms:
        return 0.0
    k = max(1, min(len(sorted_ms), int(-(-q * len(sorted_ms) // 1))))
    return sorted_ms[k - 1]


def lat_summary(ms):
    ms = sorted(ms)
    return {"p50": percentile(ms, 0.5), "p95": percentile(ms, 0.95), "p99": percentile(ms, 0.99)}


def celery_system(model, n_sat=3000, rate=200, seconds=5):
    redis = Redis(f"celery-{model}")
    res = {}
    try:
        env = dict(os.environ, BENCH_REDIS_URL=redis.celery_url,
                   BENCH_MODEL_FILE=str(MODELS / f"{model}.onnx"))
        worker = spawn([PY, "-m", "celery", "-A", "celery_app", "worker", "--concurrency", 2,
                        "--pool", "prefork", "--loglevel", "WARNING", "--without-gossip",
                        "--without-mingle", "--without-heartbeat"], env=env, cwd=BENCH,
                       log_name="celery-worker")
        os.environ["BENCH_REDIS_URL"] = redis.celery_url
        sys.path.insert(0, str(BENCH))
        import celery_app

        celery_app.app.conf.broker_url = redis.celery_url
        celery_app.app.conf.result_backend = redis.celery_url
        rows, labels = reference_rows(model)
        try:
            # warm-up (and wait for the worker to be up)
            celery_app.predict.delay([rows[0]]).get(timeout=60)
            errors = 0
            t0 = time.perf_counter()
            sent = [celery_app.predict.delay([rows[i % len(rows)]]) for i in range(n_sat)]
            for i, r in enumerate(sent):
                out = r.get(timeout=120)
                errors += out["label"][0] != labels[i % len(rows)]
            secs = time.perf_counter() - t0
            res["sat"] = {"jobs_per_s": n_sat / secs, "errors": errors, "jobs": n_sat}
            log(f"celery {model}: {res['sat']['jobs_per_s']:,.0f} jobs/s")
            # Open loop at `rate` from one thread (no GIL contention with waiters): send
            # on schedule, take results in order as they are ready; latency from schedule.
            lat, errs, pending = [], 0, collections.deque()
            n, i = int(rate * seconds), 0
            start = time.perf_counter() + 0.05
            deadline = start + seconds + 60
            while (i < n or pending) and time.perf_counter() < deadline:
                now = time.perf_counter()
                while i < n and start + i / rate <= now:
                    pending.append((start + i / rate, i,
                                    celery_app.predict.delay([rows[i % len(rows)]])))
                    i += 1
                if pending and pending[0][2].ready():
                    due, j, r = pending.popleft()
                    lat.append((time.perf_counter() - due) * 1e3)
                    errs += r.get(timeout=1)["label"][0] != labels[j % len(rows)]
                else:
                    time.sleep(0.0002)
            errs += len(pending)
            res["r200"] = {**lat_summary(lat), "errors": errs, "jobs": len(lat)}
            log(f"celery {model} {rate}/s: p95 {res['r200']['p95']:.2f} ms")
        finally:
            # Stop Celery's result listener before its Redis goes away: left running it
            # retries in a thread and stalled the next stage of the harness.
            try:
                consumer = getattr(celery_app.app.backend, "result_consumer", None)
                if consumer is not None:
                    consumer.stop()
                celery_app.app.close()
            except Exception as e:  # teardown only: report and go on
                log(f"celery teardown: {e!r}")
            stop([worker])
    finally:
        redis.close()
    return res


def flask_system(threads=8, seconds=5):
    port = free_port()
    model_file = OUT / "tutorial-rf.joblib"
    app = spawn([PY, BENCH / "flask_app.py", "--port", port, "--model-file", model_file],
                log_name="flask")
    res = {}
    try:
        wait_for("flask", lambda: http_get(port, "/health")[0] == 200, timeout=120)
        rows, labels = reference_rows(CHEAP)
        lat, errs, lock = [], [0], threading.Lock()
        until = time.perf_counter() + seconds

        def client(k):
            i = k
            while time.perf_counter() < until:
                body = json.dumps({"features": [rows[i % len(rows)]]})
                t = time.perf_counter()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("POST", "/predict", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                out = json.loads(r.read())
                c.close()
                ms = (time.perf_counter() - t) * 1e3
                with lock:
                    lat.append(ms)
                    errs[0] += r.status != 200 or out["prediction"][0] != labels[i % len(rows)]
                i += threads

        t0 = time.perf_counter()
        ts = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        secs = time.perf_counter() - t0
        res = {"jobs_per_s": len(lat) / secs, **lat_summary(lat), "errors": errs[0],
               "jobs": len(lat)}
        log(f"flask: {res['jobs_per_s']:,.0f} req/s p95 {res['p95']:.2f} ms")
    finally:
        stop([app])
    return res


# ------------------------------------------------------------------------- report

def machine_line():
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    redis_v = subprocess.run(["redis-server", "--version"], capture_output=True,
                             text=True).stdout.split()[2].removeprefix("v=")
    load = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}; "
            f"{date}; commit {commit}{' (uncommitted changes)' if dirty else ''}; "
            f"redis {redis_v}; load average at start {load:.2f}")


def fmt(x, digits=0):
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def row(system, mode, jobs=None, rows=None, p50=None, p95=None, p99=None, cpu=None,
        errors=None, note=""):
    return [system, mode, fmt(jobs), fmt(rows), fmt(p50, 2), fmt(p95, 2), fmt(p99, 2),
            fmt(cpu, 1), fmt(errors), note]


def from_report(system, mode, r, note=""):
    l = r["latency_ms"]
    sv = r.get("server") or {}
    extra = (f"batch {sv['batch_rows']:.1f} rows, wait {sv['queue_wait_ms']:.2f} ms, "
             f"infer {sv['inference_ms']:.3f} ms/batch") if sv.get("batches") else ""
    return row(system, mode, r["jobs_per_s"], r["rows_per_s"], l["p50"], l["p95"], l["p99"],
               None, sum(r["errors"].values()), "; ".join(x for x in (note, extra) if x))


def table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *map(line, rows)])


def bar(name, ours, theirs, ratio, target, ok, unit=""):
    return [name, fmt(ours, 1) + unit, fmt(theirs, 1) + unit, fmt(ratio, 2), target,
            "PASS" if ok else "MISS"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drain-jobs", type=int, default=200_000)
    ap.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: short windows, few jobs, nothing appended")
    args = ap.parse_args()
    if args.quick:
        WINDOW.update(warmup=0.5, duration=1.5)
        args.drain_jobs = min(args.drain_jobs, 20_000)
        args.no_append = True
    OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(1)))
    machine = machine_line()
    log(machine)
    t_start = time.time()
    registry = Path(tempfile.mkdtemp(prefix="iqb-registry-", dir="/tmp"))
    try:
        for m in (CHEAP, DIGITS, HEAVY):
            subprocess.run([str(BIN), "models", "add", str(MODELS / f"{m}.onnx"), "--name", m],
                           env=inferq_env(registry=registry), check=True,
                           stdout=subprocess.DEVNULL)
        ceil = run_ceiling((CHEAP, DIGITS, HEAVY))
        iq = redis_system("inferq", CHEAP, registry, args.drain_jobs)
        py = redis_system("py", CHEAP, registry, args.drain_jobs // 2)
        web = http_system(CHEAP, registry)
        cel = celery_system(CHEAP, n_sat=500 if args.quick else 3000,
                            seconds=WINDOW["duration"])
        fl = flask_system(seconds=WINDOW["duration"])
        iq_d = redis_system("inferq", DIGITS, registry, 0, full=False)
        py_d = redis_system("py", DIGITS, registry, 0, full=False)
        iq_h = redis_system("inferq", HEAVY, registry, 0, full=False, n=1, max_batch=32,
                            concurrency=128)
        py_h = redis_system("py", HEAVY, registry, 0, full=False, concurrency=128)
    finally:
        stop_all()
        shutil.rmtree(registry, ignore_errors=True)

    # ---------------------------------------------------------------- the table
    systems = [
        row("ceiling (ORT in-process, 1 thread)", "batch 1 / 32", ceil[CHEAP][1],
            ceil[CHEAP][32], note=f"rows/s at batch 1 and 32 (jobs/s column: batch 1)"),
        row("inferq, 2 workers x 1 thread", "drain", iq["drain"]["jobs_per_s"],
            iq["drain"]["jobs_per_s"], cpu=iq["drain"]["cpu_us_per_job"], errors=0,
            note=f"{iq['drain']['jobs']:,} jobs (filled at {iq['drain']['fill_jobs_per_s']:,.0f}/s); "
                 f"Redis CPU {iq['drain']['redis_cpu_us_per_job']:.1f} µs/job"),
        row("py-streams, 2 processes", "drain", py["drain"]["jobs_per_s"],
            py["drain"]["jobs_per_s"], cpu=py["drain"]["cpu_us_per_job"], errors=0,
            note=f"{py['drain']['jobs']:,} jobs; "
                 f"Redis CPU {py['drain']['redis_cpu_us_per_job']:.1f} µs/job"),
        from_report("inferq via Redis", "saturation c=256", iq["sat"]),
        from_report("py-streams via Redis", "saturation c=256", py["sat"]),
        from_report("inferq via Redis", f"50% = {iq['half']['rate']:,.0f}/s", iq["half"]),
        from_report("py-streams via Redis", f"50% = {py['half']['rate']:,.0f}/s", py["half"]),
        from_report("inferq via Redis", "200 jobs/s", iq["r200"]),
        from_report("py-streams via Redis", "200 jobs/s", py["r200"]),
        from_report("inferq via HTTP (gateway)", "saturation c=64", web["sat"]),
        from_report("inferq via HTTP (gateway)", f"50% = {web['half']['rate']:,.0f}/s",
                    web["half"]),
        row("celery + celery-batches", "saturation", cel["sat"]["jobs_per_s"],
            cel["sat"]["jobs_per_s"], errors=cel["sat"]["errors"],
            note=f"{cel['sat']['jobs']} tasks, apply_async then get"),
        row("celery + celery-batches", "200 jobs/s", None, None, cel["r200"]["p50"],
            cel["r200"]["p95"], cel["r200"]["p99"], errors=cel["r200"]["errors"]),
        row("flask + joblib (tutorial)", "8 threads", fl["jobs_per_s"], fl["jobs_per_s"],
            fl["p50"], fl["p95"], fl["p99"], errors=fl["errors"], note="requests/s"),
        from_report(f"inferq via Redis [{DIGITS}]", "saturation c=256", iq_d["sat"]),
        from_report(f"py-streams via Redis [{DIGITS}]", "saturation c=256", py_d["sat"]),
        from_report(f"inferq, 1 worker x 1 thread [{HEAVY}]", "saturation c=128", iq_h["sat"],
                    note=f"ceiling b32 {ceil[HEAVY][32]:,.0f} rows/s"),
        from_report(f"py-streams, 2 processes [{HEAVY}]", "saturation c=128", py_h["sat"]),
    ]
    header = ["system", "load", "jobs/s", "rows/s", "p50 ms", "p95 ms", "p99 ms",
              "worker CPU µs/job", "errors", "notes"]

    ceil_rows = [[m] + [fmt(ceil[m][b]) for b in (1, 8, 32, 128, 512)]
                 for m in (CHEAP, DIGITS, HEAVY)]
    ceil_table = table(["model", "b=1", "b=8", "b=32", "b=128", "b=512"], ceil_rows)

    cpu_iq, cpu_py = iq["drain"]["cpu_us_per_job"], py["drain"]["cpu_us_per_job"]
    heavy_batch = (iq_h["sat"].get("server") or {}).get("batch_rows") or 0.0
    heavy_ceiling = ceil[HEAVY][32]
    half_sv = iq["half"].get("server") or {}
    half_bound = 0.0 + 2 * half_sv.get("inference_ms", 0.0) + 2.0
    inferq_runs = [iq["sat"], iq["half"], iq["r200"], web["sat"], web["half"], iq_d["sat"],
                   iq_h["sat"]]
    lost = sum(sum(r["errors"].values()) for r in inferq_runs)
    drained_ok = iq["drain"]["jobs"] == args.drain_jobs
    bars = [
        bar("worker CPU per job ≤ 1/5 of py-streams (RF, drain)", cpu_iq, cpu_py,
            cpu_py / cpu_iq if cpu_iq else None, "≥ 5", bool(cpu_iq) and cpu_py / cpu_iq >= 5,
            " µs"),
        bar("drain capacity ≥ 3× py-streams (RF)", iq["drain"]["jobs_per_s"],
            py["drain"]["jobs_per_s"], iq["drain"]["jobs_per_s"] / py["drain"]["jobs_per_s"],
            "≥ 3", iq["drain"]["jobs_per_s"] >= 3 * py["drain"]["jobs_per_s"], "/s"),
        bar("end to end ≥ 2.5× py-streams, same producer (RF)", iq["sat"]["jobs_per_s"],
            py["sat"]["jobs_per_s"], iq["sat"]["jobs_per_s"] / py["sat"]["jobs_per_s"], "≥ 2.5",
            iq["sat"]["jobs_per_s"] >= 2.5 * py["sat"]["jobs_per_s"], "/s"),
        bar(f"heavy-mlp rows/s ≥ 0.9× ceiling at b=32 (avg batch {heavy_batch:.1f})",
            iq_h["sat"]["rows_per_s"], heavy_ceiling, iq_h["sat"]["rows_per_s"] / heavy_ceiling,
            "≥ 0.9", iq_h["sat"]["rows_per_s"] >= 0.9 * heavy_ceiling, "/s"),
        bar("p95 at 200 jobs/s ≤ py-streams' (RF)", iq["r200"]["latency_ms"]["p95"],
            py["r200"]["latency_ms"]["p95"],
            iq["r200"]["latency_ms"]["p95"] / max(py["r200"]["latency_ms"]["p95"], 1e-9), "≤ 1",
            iq["r200"]["latency_ms"]["p95"] <= py["r200"]["latency_ms"]["p95"], " ms"),
        bar("p95 at 50% of saturation ≤ max_wait + 2×inference + 2 ms", 
            iq["half"]["latency_ms"]["p95"], half_bound,
            iq["half"]["latency_ms"]["p95"] / half_bound, "≤ 1",
            iq["half"]["latency_ms"]["p95"] <= half_bound, " ms"),
        ["no job lost, duplicated or wrong (every inferq run)",
         f"{lost} errors; drain {iq['drain']['jobs']:,}/{args.drain_jobs:,}",
         f"server: {iq['server_ok']:,.0f} succeeded, {iq['server_dup']:.0f} duplicate", "–",
         "0 errors, all drained", "PASS" if lost == 0 and drained_ok and iq["server_dup"] == 0
         else "MISS"],
    ]
    bars_table = table(["bar", "inferq", "baseline", "ratio", "target", "result"], bars)
    minutes = (time.time() - t_start) / 60
    report = (f"## Comparison (bench/run.sh) of "
              f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
              f"Machine: {machine}. Whole run: {minutes:.1f} min.\n\n"
              f"ONNX Runtime in-process ceiling, rows/s (one intra-op thread):\n\n{ceil_table}\n\n"
              f"Systems ({CHEAP}, 1-row jobs, unless the model is named):\n\n"
              f"{table(header, systems)}\n\nBars (issue #7):\n\n{bars_table}\n")
    print(report)
    (OUT / "last-run.md").write_text(report)
    (OUT / "last-run.json").write_text(json.dumps(
        {"machine": machine, "ceiling": ceil, "inferq": iq, "py": py, "http": web,
         "celery": cel, "flask": fl, "digits": {"inferq": iq_d, "py": py_d},
         "heavy": {"inferq": iq_h, "py": py_h}}, indent=1, default=str))
    if not args.no_append:
        if not RESULTS.exists():
            RESULTS.write_text("# inferq benchmark results\n")
        with RESULTS.open("a") as f:
            f.write("\n" + report)
        log(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    code = 0
    try:
        main()
    except Exception as e:  # report, stop what was started, exit non-zero
        log(f"failed: {e!r}")
        code = 1
    finally:
        stop_all()
        sys.stdout.flush()
        sys.stderr.flush()
    # Celery's result consumer leaves a non-daemon thread behind; do not wait for it.
    os._exit(code)
