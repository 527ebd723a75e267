"""The VAR-agnostic core, in three layers (a public function in varkernels/ calls the first):

    autograd.py    one autograd path per form (logits, fused-linear), each with two gradient modes:
                   computed in the forward from coefficients known in advance, or recomputed in
                   backward from a saved logsumexp (``token_forward``, ``linear_token_forward``)
    linear.py      the fused-linear driver, registered as ``varkernels::linear_token_pass``: logits
                   chunk by chunk from hidden states and an lm_head weight (never [B, T, V])
    token.py       the kernels, registered as ``varkernels::token_{triton,cpu,torch}``: per-row
                   logsumexp, target log-prob and, optionally, the gradient coef·(softmax − onehot)·dz/dx
                   into a buffer (may be x); the options record ``TokenOptions`` and the sign
                   convention (``kernel_coef``)
    linear_cpu.py  the C++ backend's half-precision extras of the driver (MKL GEMM with fp32 output,
                   the deferred weight gradient)

Any loss Σ_n dlp[n]·lp[n] with policy-independent coefficients is a thin layer on
``token_forward`` / ``linear_token_forward``: the public one is the weighted NLL
(varkernels/nll.py), and VAR is weights → that loss (varkernels/var/loss.py).
"""

from .autograd import linear_token_forward, scale_grad_, token_forward
from .linear import default_chunk_size, linear_token_pass
from .token import TokenOptions, kernel_coef, token_kernel

__all__ = [
    "TokenOptions", "token_forward", "linear_token_forward", "scale_grad_", "token_kernel",
    "linear_token_pass", "default_chunk_size", "kernel_coef",
]
