"""Backend selection (``backend=`` of every public op, docs/design.md §2).

``"auto"``: CUDA tensors → Triton; CPU tensors → the C++ kernel of csrc/ when it is built,
else the chunked PyTorch path; other devices (``meta``) → the PyTorch path. ``"triton"`` on CPU
tensors needs ``TRITON_INTERPRET=1`` (set before triton is imported). ``"cpu"`` forces the C++
kernel; ``"torch"`` the PyTorch path (which also runs on CPU tensors).

``cpu_extension_available`` is a constant of a compiled graph (``_env.constant_result``): under ``torch.compile``
it runs once at trace time and its answer is a constant of the graph (no graph break on the
loader's lock). Imports only the leaves ``_env``, ``_validation`` and ``csrc_loader``.
"""

from __future__ import annotations

import torch

from . import csrc_loader
from ._env import HAS_TRITON, constant_result, load_triton_ops, triton_interpret
from ._validation import BACKENDS, check_option

__all__ = ["HAS_TRITON", "cpu_extension_available", "require_cpu_extension", "resolve_backend", "triton_interpret"]


@constant_result
def cpu_extension_available() -> bool:
    """True when the C++ CPU kernel is built (or can be JIT-built) on this machine; loads it."""
    return csrc_loader.load_extension(required=False) is not None


def require_cpu_extension() -> None:
    """Load the C++ CPU kernel or raise the loader's RuntimeError naming the cause."""
    csrc_loader.load_extension(required=True)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device``: "triton" | "cpu" | "torch" (errors name what is missing)."""
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
        load_triton_ops()
    elif backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not cpu_extension_available():
            require_cpu_extension()
    return backend
