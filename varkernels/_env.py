"""Environment probes and lazy registration (a leaf module: it imports nothing of varkernels).

``import varkernels`` imports neither triton nor ``torch._dynamo`` (which imports triton): the Triton
operators are registered on first use (:func:`load_triton_ops`, called when a call resolves to the
Triton backend), and functions whose answer is a constant of a compiled graph are marked with
:func:`constant_result`, the marker of ``torch.compiler.assume_constant_result`` set without importing
``torch._dynamo`` (tests/test_imports.py checks that it is the same marker).
"""

from __future__ import annotations

import importlib.util
import os

HAS_TRITON = importlib.util.find_spec("triton") is not None


def constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo``: under ``torch.compile``
    ``fn`` runs once at trace time and its answer is a constant of the graph (no graph break inside it)."""
    fn._dynamo_marked_constant = True
    return fn


_TRITON_REGISTRARS: list = []  # functions that register a Triton operator (token, scale, VAR weights)


def on_triton_ops(register) -> None:
    """Run ``register()`` (which calls ``torch.library.triton_op``, importing triton) in :func:`load_triton_ops`."""
    _TRITON_REGISTRARS.append(register)


@constant_result
def load_triton_ops() -> bool:
    """Register the Triton operators (``varkernels::token_triton``, ``scale_triton``, ``var_weights_triton``) once;
    imports triton. Called when a call resolves to backend "triton"."""
    while _TRITON_REGISTRARS:
        _TRITON_REGISTRARS.pop(0)()
    return True


@constant_result
def triton_interpret() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
