#!/usr/bin/env python3
"""Generate the variable-shape test models (graph-built with onnx.helper, a few hundred bytes).

Written into the output directory (default testdata/shapes):

  seq-sum.onnx     x FP32 [N, L]     -> sum FP32 [N] (sum over L), double FP32 [N, L] (2x)
  seq-fixed1.onnx  x FP32 [1, L]     -> the same two outputs, batch dimension fixed to 1
  grid-sum.onnx    x FP32 [N, H, W]  -> sum FP32 [N, H] (sum over W)
  seq-feat.onnx    x FP32 [N, L, 3]  -> sum FP32 [N, 3] (sum over L; the last axis fixed)
  seq-pool.onnx    input_ids INT64 [N, L], attention_mask INT64 [N, L]
                   -> embedding FP32 [N, 4]: the mean of the embedding-table rows of the
                      tokens whose mask is 1 (a sentence-embedding model's pooling, in small);
                      hidden FP32 [N, L, 4]: each token's table row (follows L)
  seq-encoder.onnx input_ids, attention_mask INT64 [N, L] -> embedding FP32 [N, 64]: a
                   token embedding, a per-token feed-forward layer (64 -> 256 -> 64) and
                   masked mean pooling; its work grows with the length, as a real
                   encoder's does (for bench/shapes.py)

Their answers are easy to compute by hand, so tests can check every job exactly; and a job's
answer depends on its own shape, so a job batched with another of a different shape gets a
visibly wrong one. Deterministic; run via scripts/setup.sh.
"""

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

OPSET = 17
DIM = 4
VOCAB = 32


def save(graph, path):
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="inferq")
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def seq_sum(name, batch, out):
    x = h.make_tensor_value_info("x", T.FLOAT, [batch, "L"])
    s = h.make_tensor_value_info("sum", T.FLOAT, [batch])
    d = h.make_tensor_value_info("double", T.FLOAT, [batch, "L"])
    axes = h.make_tensor("axes", T.INT64, [1], [1])
    two = h.make_tensor("two", T.FLOAT, [], [2.0])
    nodes = [
        h.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0),
        h.make_node("Mul", ["x", "two"], ["double"]),
    ]
    save(h.make_graph(nodes, name, [x], [s, d], [axes, two]), os.path.join(out, f"{name}.onnx"))


def grid_sum(out):
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", "H", "W"])
    s = h.make_tensor_value_info("sum", T.FLOAT, ["N", "H"])
    axes = h.make_tensor("axes", T.INT64, [1], [2])
    nodes = [h.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0)]
    save(h.make_graph(nodes, "grid-sum", [x], [s], [axes]), os.path.join(out, "grid-sum.onnx"))


def seq_feat(out):
    x = h.make_tensor_value_info("x", T.FLOAT, ["N", "L", 3])
    s = h.make_tensor_value_info("sum", T.FLOAT, ["N", 3])
    axes = h.make_tensor("axes", T.INT64, [1], [1])
    nodes = [h.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0)]
    save(h.make_graph(nodes, "seq-feat", [x], [s], [axes]), os.path.join(out, "seq-feat.onnx"))


def seq_pool(out):
    ids = h.make_tensor_value_info("input_ids", T.INT64, ["N", "L"])
    mask = h.make_tensor_value_info("attention_mask", T.INT64, ["N", "L"])
    emb = h.make_tensor_value_info("embedding", T.FLOAT, ["N", DIM])
    hid = h.make_tensor_value_info("hidden", T.FLOAT, ["N", "L", DIM])
    # Row t of the table is t * [1, 10, 100, 1000]: every token's contribution is visible.
    table = (np.arange(VOCAB, dtype=np.float32)[:, None] * np.array([1, 10, 100, 1000], np.float32))
    inits = [
        h.make_tensor("table", T.FLOAT, [VOCAB, DIM], table.reshape(-1).tolist()),
        h.make_tensor("axis1", T.INT64, [1], [1]),
        h.make_tensor("axis2", T.INT64, [1], [2]),
        h.make_tensor("one", T.FLOAT, [], [1.0]),
    ]
    nodes = [
        h.make_node("Gather", ["table", "input_ids"], ["hidden"], axis=0),
        h.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
        h.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        h.make_node("Mul", ["hidden", "m3"], ["masked"]),
        h.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        h.make_node("ReduceSum", ["m", "axis1"], ["count"], keepdims=1),
        h.make_node("Max", ["count", "one"], ["count1"]),
        h.make_node("Div", ["total", "count1"], ["embedding"]),
    ]
    graph = h.make_graph(nodes, "seq-pool", [ids, mask], [emb, hid], inits)
    save(graph, os.path.join(out, "seq-pool.onnx"))


def seq_encoder(out):
    rng = np.random.default_rng(7)
    vocab, dim, hidden = 1000, 64, 256

    def weights(name, shape):
        w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return h.make_tensor(name, T.FLOAT, shape, w.reshape(-1).tolist())

    ids = h.make_tensor_value_info("input_ids", T.INT64, ["N", "L"])
    mask = h.make_tensor_value_info("attention_mask", T.INT64, ["N", "L"])
    emb = h.make_tensor_value_info("embedding", T.FLOAT, ["N", dim])
    inits = [
        weights("table", [vocab, dim]), weights("w1", [dim, hidden]), weights("w2", [hidden, dim]),
        h.make_tensor("axis1", T.INT64, [1], [1]),
        h.make_tensor("axis2", T.INT64, [1], [2]),
        h.make_tensor("one", T.FLOAT, [], [1.0]),
    ]
    nodes = [
        h.make_node("Gather", ["table", "input_ids"], ["x"], axis=0),
        h.make_node("MatMul", ["x", "w1"], ["h1"]),
        h.make_node("Relu", ["h1"], ["r1"]),
        h.make_node("MatMul", ["r1", "w2"], ["h2"]),
        h.make_node("Add", ["h2", "x"], ["tokens"]),
        h.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
        h.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        h.make_node("Mul", ["tokens", "m3"], ["masked"]),
        h.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        h.make_node("ReduceSum", ["m", "axis1"], ["count"], keepdims=1),
        h.make_node("Max", ["count", "one"], ["count1"]),
        h.make_node("Div", ["total", "count1"], ["embedding"]),
    ]
    graph = h.make_graph(nodes, "seq-encoder", [ids, mask], [emb], inits)
    save(graph, os.path.join(out, "seq-encoder.onnx"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "testdata", "shapes"))
    out = ap.parse_args().out
    os.makedirs(out, exist_ok=True)
    seq_sum("seq-sum", "N", out)
    seq_sum("seq-fixed1", 1, out)
    grid_sum(out)
    seq_feat(out)
    seq_pool(out)
    seq_encoder(out)


if __name__ == "__main__":
    main()
