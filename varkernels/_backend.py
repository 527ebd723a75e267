"""Backend selection (``backend=`` of every public op, docs/design.md §2).

``"auto"``: CUDA tensors → Triton; CPU tensors → the C++ kernel of csrc/ when it is built,
else the chunked PyTorch path. ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set
before triton is imported). ``"cpu"`` forces the C++ kernel; ``"torch"`` the PyTorch path.

Both probes below are ``torch.compiler.assume_constant_result``: under ``torch.compile`` they run
once at trace time and their answer is a constant of the graph (no graph break on the loader's
lock or on the environment).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ._validation import BACKENDS, check_option

HAS_TRITON = importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def cpu_extension_available() -> bool:
    """True when the C++ CPU kernel is built (or can be JIT-built) on this machine; loads it."""
    from .csrc_loader import load_extension

    return load_extension(required=False) is not None


def require_cpu_extension() -> None:
    from .csrc_loader import load_extension

    load_extension(required=True)  # raises RuntimeError naming the cause


def resolve_backend(backend: str, device: torch.device) -> str:
    check_option("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        elif device.type == "cpu":
            backend = "cpu" if cpu_extension_available() else "torch"
        else:
            backend = "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package: pip install \"varkernels[triton]\"")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"backend='triton' got tensors on {device}; Triton kernels run on CUDA tensors, or on "
                "CPU tensors under the interpreter: set TRITON_INTERPRET=1 before triton is imported"
            )
    elif backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not cpu_extension_available():
            require_cpu_extension()
    return backend
