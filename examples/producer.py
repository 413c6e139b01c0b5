#!/usr/bin/env python3
"""A direct inferq producer in Python (redis-py), following docs/PROTOCOL.md.

Enqueues N jobs for a single-input model (by default `tutorial-rf`: 20 FP32 features,
rows taken from testdata/models/<model>.reference.json), each naming one shared reply
list, then BLPOPs that list until every job has answered.

Prints one JSON line per job on stdout: {"row": <reference row>, "record": <job record>}
and a summary on stderr. Exits 0 only when every job answered and succeeded; 1 when a
result is missing or failed; 2 for a usage error.

    .venv/bin/python examples/producer.py --redis-url redis://127.0.0.1:6379 --count 8
    .venv/bin/python examples/producer.py --redis-url redis+unix:///tmp/redis.sock --shorthand
"""

import argparse
import json
import pathlib
import sys
import time
import uuid

import redis

ROOT = pathlib.Path(__file__).resolve().parent.parent


def connect(url: str) -> redis.Redis:
    # inferq spells a unix socket `redis+unix:///path`; redis-py wants `unix:///path`.
    if url.startswith("redis+unix://"):
        url = "unix://" + url[len("redis+unix://"):]
    return redis.Redis.from_url(url)


def reference_rows(path: pathlib.Path):
    """The single input's name, datatype and rows of a reference file."""
    ref = json.loads(path.read_text())
    (tensor,) = ref["inputs"]
    rows, cols = tensor["shape"]
    data = tensor["data"]
    return tensor["name"], tensor["datatype"], [data[r * cols:(r + 1) * cols] for r in range(rows)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379",
                   help="redis://, rediss://, unix:// or redis+unix:// URL")
    p.add_argument("--model", default="tutorial-rf")
    p.add_argument("--count", type=int, default=8, help="jobs to enqueue")
    p.add_argument("--reference", type=pathlib.Path,
                   help="reference JSON with the input rows (default: testdata/models/<model>.reference.json)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for all results")
    p.add_argument("--shorthand", action="store_true",
                   help='send {"features": [row]} instead of a full OIP v2 request')
    args = p.parse_args()
    if args.count < 1:
        p.error("--count must be at least 1")

    name, datatype, rows = reference_rows(
        args.reference or ROOT / "testdata" / "models" / f"{args.model}.reference.json")
    r = connect(args.redis_url)

    # Every key of a model carries the hash tag {model} (one Redis Cluster slot).
    m = args.model
    stream = f"inferq:{{{m}}}:jobs"
    run = uuid.uuid4().hex
    reply = f"inferq:{{{m}}}:reply:{run}"  # must start with inferq:{m}:reply:

    jobs = {}  # job id -> reference row
    pipe = r.pipeline(transaction=False)
    for i in range(args.count):
        row = i % len(rows)
        job_id = f"py-{run}-{i}"  # 1-128 of [A-Za-z0-9._:-], unique per model
        if args.shorthand:
            body = {"features": [rows[row]]}
        else:
            body = {"inputs": [{"name": name, "shape": [1, len(rows[row])],
                                "datatype": datatype, "data": rows[row]}]}
        # XADD with id `*` and no MAXLEN: workers trim the stream safely themselves.
        pipe.xadd(stream, {"v": "1", "id": job_id, "body": json.dumps(body), "reply_to": reply})
        jobs[job_id] = row
    pipe.execute()
    print(f"enqueued {len(jobs)} jobs on {stream}; waiting on {reply}", file=sys.stderr)

    deadline = time.monotonic() + args.timeout
    answered = {}
    while len(answered) < len(jobs):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        # BLPOP's timeout is in seconds (fractions allowed since Redis 6).
        popped = r.blpop([reply], timeout=max(left, 0.01))
        if popped is None:
            break
        record = json.loads(popped[1])
        if record.get("id") in jobs:
            answered[record["id"]] = record

    failed = 0
    for job_id, row in jobs.items():
        record = answered.get(job_id)
        if record is None:
            # No reply: the terminal record, else the running record (if any), says
            # where the job is.
            # One round trip, the hash first (docs/PROTOCOL.md, reading a record).
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(f"inferq:{{{m}}}:job:{job_id}")
            pipe.get(f"inferq:{{{m}}}:result:{job_id}")
            h, done = pipe.execute()
            state = done.decode() if done else {k.decode(): v.decode() for k, v in h.items()} or None
            print(f"{job_id}: no result within {args.timeout}s; record: {state}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"row": row, "record": record}))
        if record["status"] != "succeeded":
            print(f"{job_id}: {record['status']}: {record.get('error_kind')}: {record.get('error')}",
                  file=sys.stderr)
            failed += 1
    print(f"{len(jobs) - failed}/{len(jobs)} jobs succeeded", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
