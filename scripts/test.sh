#!/usr/bin/env bash
# Installs what the tests need, then runs them (Triton kernels in the interpreter on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
exec $PY -m pytest -m "not slow" -q "$@"
