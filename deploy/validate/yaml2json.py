"""Prints the YAML documents of the given files as one JSON array of
{"file", "index", "doc"} (empty documents skipped). Run with the validators' venv
(.tools/deploy-validate/venv/bin/python), which has PyYAML."""

import json
import sys

import yaml

out = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        for i, doc in enumerate(yaml.safe_load_all(f)):
            if doc is not None:
                out.append({"file": path, "index": i, "doc": doc})
json.dump(out, sys.stdout)
