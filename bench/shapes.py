#!/usr/bin/env python3
"""Variable-shape batching (issue #11): one sequence model, three batching policies, one run.

The model is testdata/shapes/seq-encoder.onnx (token embedding, a per-token feed-forward
layer 64 -> 256 -> 64, masked mean pooling: its work grows with the length, as a real
encoder's). Job lengths come from a skewed distribution: most short, a few long. The same
jobs are drained by one `inferq worker` (one inference thread) under each policy:

  padding + bucketing   the version declares padding (input_ids:1, attention_mask:1)
  shape-only grouping   no padding: only jobs of one length share a batch
  one job per batch     --batch-max-rows 1

Drain mode: the worker is warmed up, stopped (SIGSTOP), the stream filled, then resumed and
timed until its /metrics counts every job finished. Padding waste is 1 - real / padded input
elements, from inferq_input_elements_total. Each answer is checked against the same job's
single run (onnxruntime in Python), so a fast wrong answer cannot pass.

  .venv/bin/python bench/shapes.py [--jobs N] [--no-append]   (bench/run.sh builds first)
"""

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as c  # noqa: E402  (the shared helpers: processes, Redis, tables, machine line)

MODEL = c.ROOT / "testdata" / "shapes" / "seq-encoder.onnx"
POLICIES = [
    ("padding + bucketing", ["--pad", "input_ids:1", "--pad", "attention_mask:1"]),
    ("shape-only grouping", []),
    ("one job per batch", ["--batch-max-rows", "1"]),
]


def lengths(n, seed=1):
    """Skewed: 70% 4-16 tokens, 25% 17-64, 5% 65-256."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        u = rng.random()
        lo, hi = (4, 16) if u < 0.70 else (17, 64) if u < 0.95 else (65, 256)
        out.append(rng.randint(lo, hi))
    return out


def job_body(rng, length):
    ids = [rng.randrange(1, 1000) for _ in range(length)]
    body = {"inputs": [
        {"name": "input_ids", "shape": [1, length], "datatype": "INT64", "data": ids},
        {"name": "attention_mask", "shape": [1, length], "datatype": "INT64", "data": [1] * length},
    ]}
    return ids, json.dumps(body, separators=(",", ":"))


def metric(port, name, **labels):
    text = c.http_get(port, "/metrics")[1].decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_policy(redis, registry, name, args, jobs):
    model = "enc-" + name.split()[0].replace("-", "")
    c.subprocess.run([str(c.BIN), "models", "add", str(MODEL), "--name", model, *args],
                     env=c.inferq_env(registry=registry), check=True, capture_output=True)
    port = c.free_port()
    env = c.inferq_env(redis, registry, serve_models=model, consumer="w",
                       metrics_listen=f"127.0.0.1:{port}", infer_threads=1, intra_threads=1)
    worker = c.spawn([c.BIN, "worker"], env=env, log_name=f"shapes-{model}")
    c.wait_for("worker metrics", lambda: c.http_get(port, "/metrics")[0] == 200)
    stream = f"inferq:{{{model}}}:jobs"
    r = redis.client
    _, warm = job_body(random.Random(0), 8)
    r.xadd(stream, {"v": "1", "id": "warm", "body": warm})
    c.wait_for("warm-up", lambda: metric(port, "inferq_jobs_finished_total", model=model) >= 1,
               timeout=60)
    worker.send_signal(signal.SIGSTOP)
    pipe = r.pipeline(transaction=False)
    for i, (_, body) in enumerate(jobs):
        pipe.xadd(stream, {"v": "1", "id": f"j{i}", "body": body})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    cpu0 = c.proc_cpu_s(worker.pid)
    t0 = time.perf_counter()
    worker.send_signal(signal.SIGCONT)
    c.wait_for("drain", lambda: metric(port, "inferq_jobs_finished_total", model=model)
               >= len(jobs) + 1, timeout=600)
    secs = time.perf_counter() - t0
    cpu = c.proc_cpu_s(worker.pid) - cpu0
    real = metric(port, "inferq_input_elements_total", model=model, kind="real")
    padded = metric(port, "inferq_input_elements_total", model=model, kind="padded")
    batches = metric(port, "inferq_batch_jobs_count", model=model)
    jobs_in = metric(port, "inferq_batch_jobs_sum", model=model)
    ok = metric(port, "inferq_jobs_finished_total", model=model, status="succeeded")
    results = r.mget([f"inferq:{{{model}}}:result:j{i}" for i in range(len(jobs))])
    c.stop([worker])
    return {
        "policy": name, "jobs": len(jobs), "seconds": secs, "jobs_per_s": len(jobs) / secs,
        "cpu_us_per_job": cpu * 1e6 / len(jobs), "waste": 1 - real / padded if padded else 0.0,
        "jobs_per_batch": jobs_in / batches if batches else 0.0, "succeeded": ok - 1,
        "results": results,
    }


def check_answers(jobs, results, policy):
    """Every answer equals the job's own single run (onnxruntime, Python), to 1e-4."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])
    wrong = 0
    for (ids, _), raw in zip(jobs, results):
        if raw is None:
            wrong += 1
            continue
        rec = json.loads(raw)
        got = np.array(rec["outputs"]["outputs"][0]["data"], dtype=np.float32)
        x = np.array([ids], dtype=np.int64)
        want = sess.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0]
        if rec["status"] != "succeeded" or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            wrong += 1
    if wrong:
        raise RuntimeError(f"{policy}: {wrong} wrong or missing answers")
    return wrong


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    c.OUT.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: (c.stop_all(), sys.exit(1)))
    machine = c.machine_line()
    c.log(machine)
    rng = random.Random(2)
    jobs = [job_body(rng, n) for n in lengths(args.jobs)]
    mean_len = sum(len(ids) for ids, _ in jobs) / len(jobs)
    out = []
    try:
        for name, flags in POLICIES:
            redis = c.Redis("shapes")
            registry = Path(tempfile.mkdtemp(prefix="iqb-shapes-reg-", dir="/tmp"))
            try:
                c.log(f"{name}: draining {len(jobs)} jobs")
                r = run_policy(redis, registry, name, flags, jobs)
                r["wrong"] = check_answers(jobs, r.pop("results"), name)
                out.append(r)
                c.log(f"{name}: {r['jobs_per_s']:.0f} jobs/s, waste {r['waste']:.1%}")
            finally:
                redis.close()
                c.shutil.rmtree(registry, ignore_errors=True)
    finally:
        c.stop_all()
    pad, shape, one = out
    rows = [[r["policy"], c.fmt(r["jobs_per_s"]), c.fmt(r["cpu_us_per_job"]),
             f"{r['jobs_per_batch']:.1f}", f"{r['waste']:.1%}", c.fmt(r["wrong"])] for r in out]
    results = c.table(["policy", "jobs/s", "worker CPU µs/job", "jobs/batch", "padding waste",
                       "wrong answers"], rows)
    bars = c.table(["bar", "inferq", "baseline", "ratio", "target", "result"], [
        c.bar("padding + bucketing vs shape-only (jobs/s)", pad["jobs_per_s"], shape["jobs_per_s"],
              pad["jobs_per_s"] / shape["jobs_per_s"], "≥ 1.5",
              pad["jobs_per_s"] >= 1.5 * shape["jobs_per_s"]),
        c.bar("padding + bucketing vs one per batch (jobs/s)", pad["jobs_per_s"], one["jobs_per_s"],
              pad["jobs_per_s"] / one["jobs_per_s"], "≥ 3",
              pad["jobs_per_s"] >= 3 * one["jobs_per_s"]),
        ["padding waste of padding + bucketing", f"{pad['waste']:.1%}", "", "", "≤ 25%",
         "PASS" if pad["waste"] <= 0.25 else "MISS"],
    ])
    text = (f"\n## Variable-shape batching (bench/shapes.py)\n\nMachine: {machine}.\n\n"
            f"seq-encoder (testdata/shapes), {len(jobs)} one-row jobs, lengths 70% 4-16, "
            f"25% 17-64, 5% 65-256 tokens (mean {mean_len:.1f}); one `inferq worker`, one "
            f"inference thread, max_batch 64, max_batch_elements 16384; drain of a filled "
            f"stream, every answer checked against its single run.\n\n"
            f"{results}\n\n{bars}\n")
    print(text)
    if not args.no_append:
        with open(c.RESULTS, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
