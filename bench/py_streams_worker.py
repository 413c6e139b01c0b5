#!/usr/bin/env python3
"""A plain Python Redis-Streams inference worker: what a competent Python engineer writes
by hand, used by bench/compare.py as the baseline inferq must beat.

It speaks inferq's Redis protocol (docs/PROTOCOL.md), so the same producer can drive both:
XREADGROUP COUNT 32 BLOCK on inferq:{m}:jobs (group `inferq`), decode the `bin` (or
`body`) payloads, one onnxruntime call per batch (one thread), then one pipelined round
trip: SET inferq:{m}:result:<id> with a TTL, RPUSH the record to the entry's `reply_to`
(when present), XACK. The record is a minimal inferq-compatible JSON:
{"id", "status": "succeeded", "outputs": {OIP v2 response}}.

    py_streams_worker.py --redis-url unix:///tmp/r.sock --model tutorial-rf \
        --model-file testdata/models/tutorial-rf.onnx [--consumer py-1] [--count 32]

Stops on SIGTERM/SIGINT after the batch in hand.
"""

import argparse
import json
import os
import signal
import socket
import struct

import numpy as np
import onnxruntime as ort
import redis

GROUP = "inferq"
CODES = {1: np.bool_, 2: np.int32, 3: np.int64, 4: np.float32, 5: np.float64}
OIP = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
       np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL"}
NP = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32, "BOOL": np.bool_}


def decode_bin(buf):
    """The IQT1 binary tensor encoding -> {name: ndarray}."""
    if buf[:4] != b"IQT1":
        raise ValueError("not IQT1")
    n, off, out = buf[4], 5, {}
    for _ in range(n):
        length = buf[off]
        name = buf[off + 1:off + 1 + length].decode()
        off += 1 + length
        code, rank = buf[off], buf[off + 1]
        off += 2
        dims = struct.unpack_from("<%dI" % rank, buf, off)
        off += 4 * rank
        dt = np.dtype(CODES[code])
        count = int(np.prod(dims)) if dims else 1
        out[name] = np.frombuffer(buf, dtype=dt, count=count, offset=off).reshape(dims)
        off += count * dt.itemsize
    return out


def decode_json(body, input_name, input_type):
    req = json.loads(body)
    if "features" in req:
        x = np.asarray(req["features"], dtype=NP[input_type])
        return {input_name: x.reshape(1, -1) if x.ndim == 1 else x}
    return {i["name"]: np.asarray(i["data"], dtype=NP[i["datatype"]]).reshape(i["shape"])
            for i in req["inputs"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--model-file", required=True)
    ap.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--ttl", type=int, default=3600)
    args = ap.parse_args()

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(args.model_file, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    input_type = {"tensor(float)": "FP32", "tensor(double)": "FP64"}.get(inp.type, "FP32")
    out_names = [o.name for o in sess.get_outputs()]

    r = redis.Redis.from_url(args.redis_url)
    stream = f"inferq:{{{args.model}}}:jobs"
    result_prefix = f"inferq:{{{args.model}}}:result:"
    reply_prefix = f"inferq:{{{args.model}}}:reply:".encode()
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise

    running = [True]

    def stop(*_):
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    while running[0]:
        resp = r.xreadgroup(GROUP, args.consumer, {stream: ">"}, count=args.count, block=1000)
        if not resp:
            continue
        entries = resp[0][1]
        jobs, xs, eids = [], [], []
        for eid, fields in entries:
            eids.append(eid)
            jid = fields.get(b"id", b"").decode()
            try:
                if b"bin" in fields:
                    x = decode_bin(fields[b"bin"])[inp.name]
                else:
                    x = decode_json(fields[b"body"], inp.name, input_type)[inp.name]
            except Exception as e:  # a bad job fails alone
                jobs.append((jid, fields.get(b"reply_to"), None, str(e)))
                continue
            jobs.append((jid, fields.get(b"reply_to"), x.shape[0], None))
            xs.append(x)
        outs = sess.run(None, {inp.name: np.concatenate(xs)}) if xs else []
        pipe = r.pipeline(transaction=False)
        at = 0
        for jid, reply_to, rows, err in jobs:
            if err is None:
                outputs = []
                for name, o in zip(out_names, outs):
                    part = o[at:at + rows]
                    outputs.append({"name": name, "datatype": OIP[part.dtype],
                                    "shape": list(part.shape), "data": part.reshape(-1).tolist()})
                at += rows
                rec = {"id": jid, "status": "succeeded",
                       "outputs": {"model_name": args.model, "id": jid, "outputs": outputs}}
            else:
                rec = {"id": jid, "status": "failed", "error": err, "error_kind": "invalid"}
            text = json.dumps(rec, separators=(",", ":"))
            pipe.set(result_prefix + jid, text, ex=args.ttl)
            if reply_to and reply_to.startswith(reply_prefix):
                pipe.rpush(reply_to, text)
                pipe.expire(reply_to, args.ttl)
        pipe.xack(stream, GROUP, *eids)
        pipe.execute()


if __name__ == "__main__":
    main()
