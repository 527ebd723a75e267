#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py): parity of every Triton path against the reference on
# CUDA (stops on a mismatch), then do_bench times and peak memory of varkernels and every
# installed peer at the Llama-3-8B and Gemma-2-2B heads, a CSV, a plot and a table.
#   bash benchmarks/gpu_suite.sh             # on a CUDA machine
#   bash benchmarks/gpu_suite.sh --dry-run   # anywhere: imports and the plan, no GPU touched
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* ]]; then
    unset TRITON_INTERPRET  # the kernels must run on the GPU, not in the interpreter
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_suite.py "$@"
