#!/usr/bin/env bash
# Fresh-machine set-up: a CPU build of torch (pinned, so pip never pulls a multi-GB CUDA build),
# then varkernels in editable mode with its test and benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
$PY -m pip install --quiet "torch==2.13.0"
$PY -m pip install --quiet -e ".[test,bench,train]"
