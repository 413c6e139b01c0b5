"""Celery + celery-batches: what a Python team would deploy today for batched inference.

Redis is both the broker and the result backend (BENCH_REDIS_URL, e.g.
redis+socket:///tmp/x/redis.sock or redis://127.0.0.1:6390/0); the task buffers calls with
celery-batches (up to 32, or 5 ms) and runs each buffer as one onnxruntime call (one thread)
on the model in BENCH_MODEL_FILE. Results go back through the result backend.

    BENCH_REDIS_URL=... BENCH_MODEL_FILE=testdata/models/tutorial-rf.onnx \
        celery -A celery_app worker --concurrency 2 --pool prefork   # (run from bench/)

Producer side: `predict.delay(rows).get()` with rows a list of feature rows.
"""

import os

import numpy as np
from celery import Celery
from celery_batches import Batches

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL_FILE = os.environ.get("BENCH_MODEL_FILE", "")

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    # celery-batches needs prefetching above flush_every (0 = unlimited).
    worker_prefetch_multiplier=0,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_session = None


def session():
    """One onnxruntime session per pool process, built on first use."""
    global _session
    if _session is None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        _session = ort.InferenceSession(MODEL_FILE, so, providers=["CPUExecutionProvider"])
    return _session


@app.task(base=Batches, flush_every=32, flush_interval=0.005)
def predict(requests):
    sess = session()
    inp = sess.get_inputs()[0]
    xs = [np.asarray(r.args[0], dtype=np.float32) for r in requests]
    rows = [x.shape[0] for x in xs]
    outs = sess.run(None, {inp.name: np.concatenate(xs)})
    names = [o.name for o in sess.get_outputs()]
    at = 0
    for req, n in zip(requests, rows):
        result = {name: o[at:at + n].tolist() for name, o in zip(names, outs)}
        at += n
        app.backend.mark_as_done(req.id, result, request=req)
