#!/usr/bin/env bash
# Set-up shared by scripts/test.sh and scripts/bench.sh: a CPU build of torch (pinned, so pip never
# pulls a multi-GB CUDA build), then varkernels in editable mode with its test, benchmark and training
# extras. --no-build-isolation: setup.py builds the C++ CPU kernel against the torch installed here;
# an isolated build environment would download another (CUDA) torch just to build it.
#
# Fast path: when nothing the install depends on has changed since this checkout last installed (the
# stamp), and $PYTHON imports varkernels from this checkout with the same C++ kernel status as then,
# pip and the C++ build are skipped (a few seconds instead of about a minute). The stamp is
# build/install-stamp inside this checkout (build/ is git-ignored), so a fresh clone always installs.
#     VARKERNELS_FORCE_INSTALL=1 bash scripts/install.sh    # ignore the stamp
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=$(pwd -P)
STAMP=build/install-stamp

# The stamp: a hash of what the install depends on (packaging files, the C++ sources and build flags
# in csrc_loader.py; other edits under varkernels/ need no reinstall, the install is editable) and of
# what $PY sees, checked outside this directory and without PYTHONPATH as a user would: its version,
# torch's, and where varkernels resolves to ("not-here" unless this checkout) and whether its
# ahead-of-time C++ kernel loads and matches csrc/ (without a compiler the package installs without
# it: the stamp then records "no-cpp"). One Python start-up, so the check costs ~2 s.
stamp() {
    {
        sha256sum pyproject.toml setup.py varkernels/csrc_loader.py csrc/*
        (cd / && env -u PYTHONPATH "$PY" - "$ROOT" 2>/dev/null <<'PYEOF'
import importlib, pathlib, sys
print(sys.executable, sys.version)
import torch
print("torch", torch.__version__)
import varkernels
from varkernels import csrc_loader
if pathlib.Path(varkernels.__file__).resolve().parent != pathlib.Path(sys.argv[1]) / "varkernels":
    sys.exit("not-here")  # another checkout's editable install, or a site-packages copy
try:
    mod = importlib.import_module(csrc_loader.AOT_MODULE)
except (ImportError, OSError):
    mod = None
print("cpp" if mod is not None and getattr(mod, "source_hash", None) == csrc_loader.source_hash() else "no-cpp")
PYEOF
        ) || echo "not installed here"
    } | sha256sum | cut -d' ' -f1
}

if [[ "${VARKERNELS_FORCE_INSTALL:-0}" != 1 && -f $STAMP ]]; then
    if [[ "$(cat $STAMP)" == "$(stamp)" ]]; then
        echo "install.sh: up to date, checked in ${SECONDS} s (build/install-stamp matches;" \
             "VARKERNELS_FORCE_INSTALL=1 reinstalls)"
        exit 0
    fi
fi
echo "install.sh: installing torch 2.13.0 (CPU) and varkernels[test,bench,train] in editable mode" \
     "(builds the C++ kernel: about a minute)"
rm -f $STAMP
$PY -m pip install --quiet --disable-pip-version-check "torch==2.13.0" "setuptools>=64" wheel ninja
$PY -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test,bench,train]"
mkdir -p build
stamp >$STAMP  # after the install: torch may have changed
echo "install.sh: installed in ${SECONDS} s"
