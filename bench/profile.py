#!/usr/bin/env python3
"""Where a one-row job's time goes in inferq (tutorial-rf, `bin` entries, drain mode).

Two inferq workers (1 inference thread each) drain a filled queue while `perf record`
samples them (DWARF call graphs) and Redis counts its commands (INFO commandstats).
Prints, and writes to bench/out/profile.md:
  - worker CPU per job, split by what the samples were doing (self time by bucket:
    ONNX Runtime, Redis client, JSON, binary decode, allocation, kernel/syscalls ...);
  - the worker functions with the largest inclusive time (decode, validation, ORT
    call, result building, the Redis round trips) from the call graph;
  - Redis CPU per job and its commands per job (calls and µs).

    .venv/bin/python bench/profile.py [--jobs 100000]     # after bench/run.sh built inferq
"""

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as c  # noqa: E402

# Self-time buckets: first match wins (dso, then symbol patterns).
BUCKETS = [
    ("ONNX Runtime (libonnxruntime)", lambda d, s: "onnxruntime" in d),
    ("kernel (syscalls, network, scheduling)", lambda d, s: "kernel" in d or d.startswith("[")),
    ("libc (memcpy, syscalls wrappers)", lambda d, s: "libc" in d or "ld-linux" in d),
    ("allocator (mimalloc/malloc)", lambda d, s: re.search(r"\bmi_|mimalloc|malloc|free\b|_rjem|realloc", s)),
    ("JSON (serde_json, results and records)", lambda d, s: "serde_json" in s or "serde::" in s),
    ("Redis client (redis crate: encode, parse)", lambda d, s: re.search(r"\bredis::|combine::", s)),
    ("binary decode (protocol::binary)", lambda d, s: "protocol::binary" in s),
    ("validation (runtime::signature)", lambda d, s: "signature" in s),
    ("tensor copies (runtime::session, TensorData)", lambda d, s: re.search(r"runtime::session|TensorData|ndarray", s)),
    ("ort crate glue", lambda d, s: re.search(r"\bort::", s)),
    ("async runtime (tokio)", lambda d, s: "tokio" in s or "futures" in s),
    ("metrics (prometheus)", lambda d, s: "prometheus" in s),
    ("worker pipeline (inferq::worker, queue)", lambda d, s: re.search(r"inferq::(worker|queue|batcher)", s)),
    ("other inferq / std", lambda d, s: True),
]

def perf_rows(data, children):
    """(percent, dso, symbol) rows of `perf report`."""
    args = ["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym",
            "--percent-limit", "0.01", "-g", "none"]
    args.append("--children" if children else "--no-children")
    out = subprocess.run(args, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(?:([\d.]+)%\s+)?(\S+)\s+\[[.k]\]\s+(.*)$", line)
        if m:
            pct = float(m.group(1))
            rows.append((pct, m.group(3), m.group(4).strip()))
    return rows


def commandstats(client):
    stats = {}
    for k, v in client.info("commandstats").items():
        stats[k.removeprefix("cmdstat_")] = (v["calls"], v["usec"])
    return stats


def cpu_s(pid):
    f = Path(f"/proc/{pid}/stat").read_text()
    f = f[f.rfind(")") + 2:].split()
    return (int(f[11]) + int(f[12])) / 100.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    args = ap.parse_args()
    c.OUT.mkdir(parents=True, exist_ok=True)
    registry = Path(tempfile.mkdtemp(prefix="iqb-registry-", dir="/tmp"))
    subprocess.run([str(c.BIN), "models", "add", str(c.MODELS / "tutorial-rf.onnx"), "--name",
                    "tutorial-rf"], env=c.inferq_env(registry=registry), check=True,
                   stdout=subprocess.DEVNULL)
    redis = c.Redis("profile")
    data = c.OUT / "worker.perf.data"
    try:
        w = c.Workers("inferq", redis, "tutorial-rf", registry=registry)
        w.signal(signal.SIGSTOP)
        time.sleep(0.2)
        c.inferq_bench(redis, "tutorial-rf", "--fill", args.jobs)
        redis.client.config_resetstat()
        perf = subprocess.Popen(["perf", "record", "-F", "999", "--call-graph", "dwarf,16384",
                                 "-o", str(data), "-p", ",".join(map(str, w.pids))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        redis_cpu0 = cpu_s(redis.proc.pid)
        cmd = [c.BIN, "bench", "tutorial-rf", "--drain-wait", "--json", "--duration-s", 120,
               "--reference", c.MODELS / "tutorial-rf.reference.json",
               "--pids", ",".join(map(str, w.pids))]
        p = subprocess.Popen([str(x) for x in cmd], env=c.inferq_env(redis),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stderr.readline()
        w.signal(signal.SIGCONT)
        out, _ = p.communicate(timeout=180)
        redis_cpu = cpu_s(redis.proc.pid) - redis_cpu0
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=60)
        stats = commandstats(redis.client)
        w.close()
    finally:
        redis.close()
        c.stop_all()
    import json

    d = json.loads(out)
    jobs, worker_us = d["jobs"], d["cpu_us_per_job"]
    lines = [f"Drain of {jobs:,} one-row tutorial-rf jobs (`bin`), 2 inferq workers x 1 "
             f"inference thread: {d['jobs_per_s']:,.0f} jobs/s; worker CPU "
             f"{worker_us:.1f} µs/job; Redis CPU {redis_cpu * 1e6 / jobs:.1f} µs/job "
             f"(from /proc, 10 ms ticks).", ""]
    flat = perf_rows(data, children=False)
    total = sum(r[0] for r in flat) or 1.0
    buckets = {name: 0.0 for name, _ in BUCKETS}
    top = {name: [] for name, _ in BUCKETS}
    for pct, dso, sym in flat:
        for name, match in BUCKETS:
            if match(dso, sym):
                buckets[name] += pct
                top[name].append((pct, sym))
                break
    lines += ["Worker CPU by what it was doing (self time, perf samples):", "",
              "| bucket | share | µs/job | top symbols |", "|---|---|---|---|"]
    for name, pct in sorted(buckets.items(), key=lambda kv: -kv[1]):
        if pct < 0.05:
            continue
        syms = "; ".join(s[:60] for _, s in sorted(top[name], reverse=True)[:3])
        lines.append(f"| {name} | {pct / total * 100:.1f}% | {pct / total * worker_us:.2f} | "
                     f"{syms.replace('|', '/')} |")
    incl = perf_rows(data, children=True)
    lines += ["", "Worker functions, inclusive (DWARF call graph; inlined callees count in "
              "their caller, ORT frames may not unwind to their caller):", "",
              "| function | share | µs/job |", "|---|---|---|"]
    seen = set()
    for pct, _, sym in sorted(incl, reverse=True):
        name = re.sub(r"::\{\{closure\}\}.*$|<.*>::", "", sym)[:90]
        if not re.search(r"inferq::|\bort::|\bredis::", sym) or name in seen:
            continue
        if re.search(r"main|block_on|Spawner|Worker::start|Pipeline::run$", name):
            continue
        seen.add(name)
        lines.append(f"| `{name}` | {pct:.1f}% | {pct / 100 * worker_us:.2f} |")
        if len(seen) >= 18:
            break
    lines += ["", "Redis commands per job (INFO commandstats over the drain; calls inside "
              "Lua scripts included):", "", "| command | calls/job | µs/job |", "|---|---|---|"]
    for cmd_name, (calls, usec) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        if calls / jobs < 0.001:
            continue
        lines.append(f"| {cmd_name} | {calls / jobs:.3f} | {usec / jobs:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (c.OUT / "profile.md").write_text(text)


if __name__ == "__main__":
    main()
