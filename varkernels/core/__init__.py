"""The VAR-agnostic core: the token op as registered PyTorch operators, and its autograd.

    token.py     varkernels::token_{triton,cpu,torch}: per-row logsumexp, target log-prob and,
                 optionally, the gradient coef·(softmax − onehot)·dz/dx into a buffer (may be x)
    linear.py    varkernels::linear_token_pass: the same from hidden states and an lm_head
                 weight, chunk by chunk (never [B, T, V] logits)
    autograd.py  one autograd path per form (logits, fused-linear), each with two gradient
                 modes: computed in the forward from coefficients known in advance, or
                 recomputed in backward from a saved logsumexp

Any loss Σ_n coef[n]·lp[n] with policy-independent coefficients is a thin layer on
``token_forward`` / ``linear_token_forward`` (VAR is one: varkernels/var/loss.py).
"""

from .autograd import linear_token_forward, scale_grad_, token_forward
from .linear import default_chunk_size, linear_token_op, linear_token_pass
from .token import token_op

__all__ = [
    "token_forward", "linear_token_forward", "scale_grad_", "token_op", "linear_token_op", "linear_token_pass",
    "default_chunk_size",
]
