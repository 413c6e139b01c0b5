#!/usr/bin/env python3
"""Generate inferq's demo ONNX models and their reference input/output files.

For every model NAME this writes, into the output directory (default testdata/models):

  NAME.onnx            the model, exported with skl2onnx
  NAME.reference.json  {"model", "inputs", "outputs", "dataset", "accuracy"}

Reference inputs are rows from a held-out test split; reference outputs are computed with
onnxruntime.InferenceSession (CPU) on the exported model, not with scikit-learn. Tensors use
the Open Inference Protocol v2 layout: {"name", "datatype", "shape", "data" (flat, row-major)}.
FP32 values are stored as the exact double value of the float32, so they round-trip exactly.

Everything is deterministic (fixed random_state everywhere). Run via scripts/setup.sh, which
uses the pinned .venv; run by hand with `.venv/bin/python scripts/make_models.py`.
"""

import argparse
import json
import os
import warnings

import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from sklearn.datasets import load_diabetes, load_digits, load_iris, make_classification
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

# onnxruntime 1.32 runs far newer opsets; these are what skl2onnx 1.20 is well tested with.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
INPUT_NAME = "input"
N_REF = 32  # reference rows per model (iris-fixed1: N_REF_FIXED)
N_REF_FIXED = 8

# ONNX tensor element type -> Open Inference Protocol v2 datatype
V2_DATATYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int16)": "INT16",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}
NP_DATATYPES = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.bool_): "BOOL",
}


def tensor_json(name, arr):
    arr = np.ascontiguousarray(arr)
    dt = NP_DATATYPES[arr.dtype]
    # .tolist() turns float32 into the Python float of the exact float32 value, int64 into int,
    # bool into bool; json.dumps writes the shortest repr that round-trips that double exactly.
    return {"name": name, "datatype": dt, "shape": list(arr.shape), "data": arr.reshape(-1).tolist()}


def make_session(onx):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(onx.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_rows(sess, x, one_at_a_time):
    """Run sess on x; return [ndarray per output]. one_at_a_time: run each row separately and
    concatenate along axis 0 (for models whose batch dimension is fixed to 1)."""
    if not one_at_a_time:
        return sess.run(None, {INPUT_NAME: x})
    per_row = [sess.run(None, {INPUT_NAME: x[i : i + 1]}) for i in range(x.shape[0])]
    return [np.concatenate([r[k] for r in per_row], axis=0) for k in range(len(per_row[0]))]


def export(name, model, x_test, y_test, tensor_type, n_features, dtype, dataset, out_dir,
           classifier=True, batch=None, n_ref=N_REF):
    options = {id(model): {"zipmap": False}} if classifier else None
    onx = convert_sklearn(
        model,
        name=name,
        initial_types=[(INPUT_NAME, tensor_type([batch, n_features]))],
        target_opset=TARGET_OPSET,
        options=options,
    )
    # Make the file bytes independent of the producer run (no timestamps are written by skl2onnx,
    # but pin the doc string anyway).
    onx.doc_string = f"inferq demo model {name}"
    path = os.path.join(out_dir, f"{name}.onnx")
    with open(path, "wb") as f:
        f.write(onx.SerializeToString())

    sess = make_session(onx)
    one_at_a_time = batch == 1
    x_test = x_test.astype(dtype)

    # Accuracy / R2 of the exported model (as run by onnxruntime) on the whole test split.
    full = run_rows(sess, x_test, one_at_a_time)
    if classifier:
        accuracy = float(np.mean(full[0].reshape(-1) == y_test))
    else:
        pred = full[0].reshape(-1).astype(np.float64)
        y = y_test.astype(np.float64)
        accuracy = float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))

    x_ref = np.ascontiguousarray(x_test[:n_ref])
    outs = run_rows(sess, x_ref, one_at_a_time)
    out_names = [o.name for o in sess.get_outputs()]
    for o, arr in zip(sess.get_outputs(), outs):
        assert V2_DATATYPES[o.type] == NP_DATATYPES[arr.dtype], (name, o.type, arr.dtype)

    ref = {
        "model": name,
        "inputs": [tensor_json(INPUT_NAME, x_ref)],
        "outputs": [tensor_json(n, a) for n, a in zip(out_names, outs)],
        "dataset": dataset,
        "accuracy": accuracy,
    }
    with open(os.path.join(out_dir, f"{name}.reference.json"), "w") as f:
        json.dump(ref, f, separators=(",", ":"))
        f.write("\n")

    def sig(items):
        return ", ".join(f"{i.name}:{V2_DATATYPES.get(i.type, i.type)}{list(i.shape)}" for i in items)

    print(f"{name:13s} in [{sig(sess.get_inputs())}] out [{sig(sess.get_outputs())}] "
          f"{'accuracy' if classifier else 'r2'}={accuracy:.4f} size={os.path.getsize(path)}B")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "testdata", "models"))
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)

    # tutorial-rf: binary classification, 20 features
    X, y = make_classification(n_samples=1000, n_features=20, random_state=42)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=42)
    rf = RandomForestClassifier(n_estimators=100, random_state=42).fit(Xtr.astype(np.float32), ytr)
    export("tutorial-rf", rf, Xte, yte, FloatTensorType, 20, np.float32,
           "make_classification(n_samples=1000, n_features=20, random_state=42); "
           "test_size=0.25, random_state=42", out)

    # digits-mlp: 10 classes, 64 features scaled to [0, 1]
    d = load_digits()
    Xd = d.data / 16.0
    Xtr, Xte, ytr, yte = train_test_split(Xd, d.target, test_size=0.25, random_state=0,
                                          stratify=d.target)
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0).fit(Xtr, ytr)
    export("digits-mlp", mlp, Xte, yte, FloatTensorType, 64, np.float32,
           "sklearn load_digits, X/16; test_size=0.25, random_state=0, stratified", out)

    # diabetes-gbr: regression, 10 features, output [N, 1]
    db = load_diabetes()
    Xtr, Xte, ytr, yte = train_test_split(db.data, db.target, test_size=0.25, random_state=0)
    gbr = GradientBoostingRegressor(n_estimators=100, max_depth=2, learning_rate=0.05,
                                    random_state=0).fit(Xtr, ytr)
    export("diabetes-gbr", gbr, Xte, yte, FloatTensorType, 10, np.float32,
           "sklearn load_diabetes; test_size=0.25, random_state=0", out, classifier=False)

    # iris-f64: FP64 input
    ir = load_iris()
    Xtr, Xte, ytr, yte = train_test_split(ir.data, ir.target, test_size=0.25, random_state=0,
                                          stratify=ir.target)
    lr = LogisticRegression(max_iter=1000, random_state=0).fit(Xtr, ytr)
    export("iris-f64", lr, Xte, yte, DoubleTensorType, 4, np.float64,
           "sklearn load_iris; test_size=0.25, random_state=0, stratified", out)

    # iris-fixed1: FP32 input with the batch dimension fixed to 1
    lr1 = LogisticRegression(max_iter=1000, random_state=0).fit(Xtr.astype(np.float32), ytr)
    export("iris-fixed1", lr1, Xte, yte, FloatTensorType, 4, np.float32,
           "sklearn load_iris; test_size=0.25, random_state=0, stratified; "
           "reference outputs = 8 single-row runs concatenated", out, batch=1, n_ref=N_REF_FIXED)

    # heavy-mlp: compute-heavy benchmark model, digits upsampled to 16x16 = 256 features
    imgs = np.kron(d.images, np.ones((1, 2, 2))).reshape(len(d.images), 256) / 16.0
    Xtr, Xte, ytr, yte = train_test_split(imgs, d.target, test_size=0.25, random_state=0,
                                          stratify=d.target)
    heavy = MLPClassifier(hidden_layer_sizes=(1024, 1024, 1024), max_iter=8,
                          random_state=0).fit(Xtr, ytr)
    export("heavy-mlp", heavy, Xte, yte, FloatTensorType, 256, np.float32,
           "sklearn load_digits upsampled 2x (np.kron) to 16x16=256 features, /16; "
           "test_size=0.25, random_state=0, stratified", out)


if __name__ == "__main__":
    main()
