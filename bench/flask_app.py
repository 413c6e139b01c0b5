#!/usr/bin/env python3
"""The tutorial's way: a threaded Flask app serving the scikit-learn RandomForest that
was pickled with joblib. Trained exactly as scripts/make_models.py trains tutorial-rf
(make_classification(n_samples=1000, n_features=20, random_state=42), 100 trees,
random_state=42) and saved to --model-file the first time.

    flask_app.py --port 5055 --model-file bench/out/tutorial-rf.joblib

POST /predict {"features": [[20 floats], ...]} -> {"prediction": [...], "probabilities": [...]}
"""

import argparse
import logging
import os

import joblib
import numpy as np
from flask import Flask, jsonify, request


def train(path):
    from sklearn.datasets import make_classification
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    X, y = make_classification(n_samples=1000, n_features=20, random_state=42)
    Xtr, _, ytr, _ = train_test_split(X, y, test_size=0.25, random_state=42)
    rf = RandomForestClassifier(n_estimators=100, random_state=42).fit(Xtr.astype(np.float32), ytr)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    joblib.dump(rf, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model-file", required=True)
    args = ap.parse_args()
    if not os.path.exists(args.model_file):
        train(args.model_file)
    model = joblib.load(args.model_file)
    app = Flask(__name__)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    @app.post("/predict")
    def predict():
        x = np.asarray(request.get_json()["features"], dtype=np.float32).reshape(-1, 20)
        proba = model.predict_proba(x)
        return jsonify({"prediction": model.classes_[proba.argmax(axis=1)].tolist(),
                        "probabilities": proba.tolist()})

    @app.get("/health")
    def health():
        return "ok"

    app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
