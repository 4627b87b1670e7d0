#!/usr/bin/env bash
# Set up (if needed) and run the main job end to end on bundled offline data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
OUT=${DEMO_OUT:-runs/demo}
rm -rf "$OUT" && mkdir -p "$OUT"
python examples/digits/make_model.py "$OUT/model.pt"
dendrite-convert "$OUT/model.pt" --factory examples/digits/model.py:build -o "$OUT/converted"
dendrite inspect "$OUT/converted"
# Neuron/dendrite alternation on digits (about half a minute on 2 CPU cores); prints the summary.
# The converted directory rebuilds its architecture with the factory: name it again so its code may run.
dendrite-train "$OUT/converted" --adapter examples/digits/adapter.py -o "$OUT/run" --patience 5 --max-epochs 60 --json \
  --factory examples/digits/model.py:build
# Dendrites folded into plain layers, verified with onnxruntime against the trained model, latency table.
# (run/best records no example input, so the adapter's first validation batch is the example.)
dendrite-export "$OUT/run/best" --onnx -o "$OUT/model.onnx" --adapter examples/digits/adapter.py \
  --factory examples/digits/model.py:build
