"""The VAR-agnostic core: the token op as registered PyTorch operators, and its autograd.

    token.py     varkernels::token_{triton,cpu,torch}: per-row logsumexp, target log-prob and,
                 optionally, the gradient coef·(softmax − onehot)·dz/dx into a buffer (may be x);
                 the options record ``TokenOptions`` and the sign convention (``kernel_coef``)
    linear.py    varkernels::linear_token_pass: the same from hidden states and an lm_head
                 weight, chunk by chunk (never [B, T, V] logits)
    autograd.py  one autograd path per form (logits, fused-linear), each with two gradient
                 modes: computed in the forward from coefficients known in advance, or
                 recomputed in backward from a saved logsumexp

Any loss Σ_n dlp[n]·lp[n] with policy-independent coefficients is a thin layer on
``token_forward`` / ``linear_token_forward``: the public one is the weighted NLL
(varkernels/nll.py), and VAR is weights → that loss (varkernels/var/loss.py).
"""

from .autograd import linear_token_forward, scale_grad_, token_forward
from .linear import default_chunk_size, linear_token_pass, run_linear_token
from .token import TokenOptions, kernel_coef, run_token, token_op

__all__ = [
    "TokenOptions", "token_forward", "linear_token_forward", "scale_grad_", "token_op", "run_token",
    "run_linear_token", "linear_token_pass", "default_chunk_size", "kernel_coef",
]
