#!/usr/bin/env bash
# Create .venv (Python 3.11) with CPU torch and this package with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# The CPU wheel is pinned here only; pyproject keeps torch>=2.6 open.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# timm (test/benchmark dependency for the real-architecture zoo) needs torchvision, whose only wheel for this
# torch is a CUDA build: in site-packages it would break `import lightning` and most of transformers. Both go,
# without dependencies, into .venv/timm-extras, which only fixtures/timm_import.py puts on sys.path.
if [ ! -d .venv/timm-extras/timm ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .venv/timm-extras \
    "timm==1.0.31" "torchvision==0.28.0"
fi
