"""Environment probes (a leaf module: it imports nothing of varkernels).

``triton_interpret()`` is ``torch.compiler.assume_constant_result``: under ``torch.compile`` it runs
once at trace time and its answer is a constant of the graph (no graph break on the environment).
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
