#!/usr/bin/env bash
# The GPU suite (benchmarks/gpu_suite.py), for one short run on a lent GPU whose image is fixed: no install step,
# no network. Stages: smoke, calibration of the device's peak rates, parity of every Triton path on CUDA, then
# timings at the Llama-3-8B and Gemma-2-2B heads and of the logits-form loss; CSV rows appended as each case ends.
#   bash benchmarks/gpu_suite.sh                        # on the GPU: every stage within --budget-s (default 540 s)
#   bash benchmarks/gpu_suite.sh --resume               # continue the last run after a budget stop (exit status 3)
#   bash benchmarks/gpu_suite.sh --smoke                # the first minute only
#   bash benchmarks/gpu_suite.sh --wheels DIR           # peers (liger-kernel, cut-cross-entropy) from wheel files
#   bash benchmarks/gpu_suite.sh --dry-run              # anywhere: imports and the staged plan, no GPU touched
# Send back benchmarks/results/gpu_suite.csv (docs/benchmarks.md, "GPU suite").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ " $* " != *" --dry-run "* && " $* " != *" --fake "* ]]; then
    unset TRITON_INTERPRET  # the kernels must run on the GPU, not in the interpreter
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The suite runs CUDA tensors only: never JIT-build the C++ CPU kernel (minutes on a fresh image, and the copy
# built for this project's Python would not load under another).
export VARKERNELS_DISABLE_CPP="${VARKERNELS_DISABLE_CPP:-1}"
exec "$PY" benchmarks/gpu_suite.py "$@"
