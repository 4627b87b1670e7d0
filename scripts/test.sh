#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow end-to-end tests included, one worker per core
# (tests run single-threaded; see tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n auto "$@"
