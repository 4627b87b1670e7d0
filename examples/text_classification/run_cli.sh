#!/usr/bin/env bash
# The same task through the command line: convert -> dendrite-train -> dendrite-export --onnx.
# Usage: examples/text_classification/run_cli.sh [work-dir]   (about a minute or two on 2 CPU cores)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
python "$here/make_model.py" "$work/tiny_bert"
dendrite-convert "$work/tiny_bert" -o "$work/converted" --force
dendrite-train "$work/converted" --adapter "$here/adapter.py" -o "$work/run" --patience 2 --max-epochs 20 --force
dendrite-export "$work/run/best" --onnx -o "$work/model.onnx" --force --no-latency
echo "outputs in $work"
