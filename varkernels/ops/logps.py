"""Differentiable per-token / per-sequence log-probs (SPEC §3 "generic log-prob mode").

For reference scoring, DPO-style losses and any loss that is not VAR. The forward runs the
token op without a gradient and saves only the per-token logsumexp ([B·T] fp32); the backward
runs it again with that logsumexp (one sweep instead of two) and coef = −grad_lp:

    d lp[n] / d x[n, v] = (onehot(y)_v − softmax(z)_v) · dz/dx

Under ``torch.no_grad()`` nothing is saved. ``linear_sequence_logps`` does the same from hidden
states and an lm_head weight, chunk by chunk, never holding more than a chunk of logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import LOGP_REDUCTIONS, check_option
from .token import prepare_token_call, token_op


class TokenLogpsFunction(torch.autograd.Function):
    """lp [B, T] fp32 = log_softmax(transform(logits)).gather(labels), 0 where ignored."""

    @staticmethod
    def forward(ctx, logits, labels_flat, backend, softcap, temperature, ignore_index, save):
        B, T, _ = logits.shape
        lp, lse = token_op(
            backend, logits.detach(), labels_flat, softcap=softcap, temperature=temperature,
            ignore_index=ignore_index,
        )
        if save:
            ctx.save_for_backward(logits, labels_flat, lse)
        ctx.opts = (backend, softcap, temperature, ignore_index)
        return lp.view(B, T)

    @staticmethod
    def backward(ctx, grad_lp):
        logits, labels_flat, lse = ctx.saved_tensors
        backend, softcap, temperature, ignore_index = ctx.opts
        grad = torch.empty_like(logits)
        coef = grad_lp.reshape(-1).to(torch.float32).neg().contiguous()
        token_op(
            backend, logits.detach(), labels_flat, coef, grad, lse_in=lse, softcap=softcap,
            temperature=temperature, ignore_index=ignore_index,
        )
        return grad, None, None, None, None, None, None


def reduce_token_logps(lp: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    """[B, T] token log-probs → [B] ("sum" / "mean" over non-ignored tokens) or as is ("none")."""
    if reduction == "none":
        return lp
    s = lp.sum(dim=1)
    if reduction == "mean":
        s = s / (labels != ignore_index).sum(dim=1).clamp(min=1).to(s.dtype)
    return s




def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probs of ``labels`` under ``logits``, differentiable, without [B, T, V] log-probs.

    Args:
        logits: [B, T, V] float32/bfloat16/float16. labels: [B, T] int64/int32.
        reduction: "mean" (per non-ignored token; 0 for an all-ignored row), "sum", or "none".
    Returns:
        float32 [B] ("mean"/"sum") or [B, T] ("none", 0 at ignored positions).
    """
    check_option("reduction", reduction, LOGP_REDUCTIONS)
    V = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 3 else 0
    backend, labels_eff = prepare_token_call(
        "logits", logits, labels, V, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature, backend=backend,
    )
    save = torch.is_grad_enabled() and logits.requires_grad
    lp = TokenLogpsFunction.apply(
        logits, labels_eff.reshape(-1).contiguous(), backend, softcap, float(temperature), ignore_index, save
    )
    return reduce_token_logps(lp, labels_eff, ignore_index, reduction)
