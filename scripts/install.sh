#!/usr/bin/env bash
# Fresh-machine set-up: a CPU build of torch (pinned, so pip never pulls a multi-GB CUDA build),
# then varkernels in editable mode with its test, benchmark and training extras.
# --no-build-isolation: setup.py builds the C++ CPU kernel against the torch installed here;
# an isolated build environment would download another (CUDA) torch just to build it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "setuptools>=64" wheel ninja
$PY -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test,bench,train]"
