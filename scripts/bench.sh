#!/usr/bin/env bash
# Installs what the benchmark needs, then runs the main job: fused vs naive VAR loss on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
exec $PY benchmarks/bench_var_loss.py "$@"
