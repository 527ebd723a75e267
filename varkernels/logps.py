"""Differentiable per-token / per-sequence log-probs: the core's backward-mode token op.

For reference scoring, DPO-style losses and any loss whose per-token coefficients depend on the
log-probs. The forward saves only the per-token logsumexp ([B·T] fp32); the backward recomputes
softmax with coef = −grad_lp (one sweep instead of two):

    d lp[n] / d x[n, v] = (onehot(y)_v − softmax(z)_v) · dz/dx

Under ``torch.no_grad()`` nothing is saved. ``linear_sequence_logps`` does the same from hidden
states and an lm_head weight, chunk by chunk, never holding more than a chunk of logits.

``return_entropy=True`` also returns the per-sequence mean token entropy of the policy, computed by
the token op in the same logsumexp sweep (one more running sum per row, no extra pass).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._docs import compose
from ._prepare import prepare_call
from ._validation import LOGP_REDUCTIONS, check_option
from .core.autograd import linear_token_forward, token_forward


def sequence_entropy(ent: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[B] fp32 mean over the non-ignored tokens of each row of the token entropies ``ent`` [B·T] (the token
    op's, 0 at ignored positions); 0 for a row without tokens. ``labels``: [B, T], already shifted."""
    return reduce_token_logps(ent.view(labels.shape), labels, ignore_index, "mean")


def _reduced(out: tuple, call, labels: torch.Tensor, reduction: str, return_entropy: bool):
    """The log-prob functions' result from the core's (value, lp[, entropy]): logps reduced like ``reduction``,
    with ``return_entropy`` the pair (logps, entropy): per token under "none", else the per-sequence mean."""
    ignore_index = call.opts.ignore_index
    logps = reduce_token_logps(out[1].view(labels.shape), call.labels, ignore_index, reduction)
    if not return_entropy:
        return logps
    return logps, out[2].view(labels.shape) if reduction == "none" else sequence_entropy(out[2], call.labels,
                                                                                          ignore_index)


def reduce_token_logps(lp: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    """[B, T] token log-probs → [B] ("sum" / "mean" over non-ignored tokens) or as is ("none")."""
    if reduction == "none":
        return lp
    s = lp.sum(dim=1)
    if reduction == "mean":
        s = s / (labels != ignore_index).sum(dim=1).clamp(min=1).to(s.dtype)
    return s


@compose
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
    return_entropy: bool = False,
):
    """Log-probs of ``labels`` under ``logits``, differentiable, without [B, T, V] log-probs.

    Args:
        {logits}
        {labels}
        reduction: "mean" (per non-ignored token; 0 for an all-ignored row), "sum", or "none".
        {shift_labels}
        {transforms}
        {backend}
        {return_entropy}
    Returns:
        float32 [B] ("mean"/"sum") or [B, T] ("none", 0 at ignored positions); with ``return_entropy=True``
        the pair ``(logps, entropy)``.
    """
    check_option("reduction", reduction, LOGP_REDUCTIONS)
    call = prepare_call("logits", logits, labels, ignore_index=ignore_index, shift_labels=shift_labels,
                        softcap=softcap, temperature=temperature, backend=backend, return_entropy=return_entropy)
    out = token_forward(logits, call.flat_labels, None, call.opts, entropy=bool(return_entropy))
    return _reduced(out, call, labels, reduction, return_entropy)


@compose
def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    chunk_size: Optional[int] = None,
    grad_accum_dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    return_entropy: bool = False,
):
    """Log-probs of ``labels`` from hidden states [B, T, H] and lm_head weight [V, H] (+ bias [V]).

    Differentiable w.r.t. hidden, weight and bias; the forward saves only the per-token
    logsumexp, the backward recomputes each logits chunk. Under ``torch.no_grad()`` nothing is
    saved (reference scoring). Returns float32 [B] ("mean"/"sum") or [B, T] ("none"); with
    ``return_entropy=True`` the pair ``(logps, entropy)``, entropy as in :func:`sequence_logps`, each
    chunk's entropy computed by its token op.

    Args:
        {hidden}
        {weight}
        labels, reduction and the other keywords: as in :func:`sequence_logps`.
        {chunk_size}
        {grad_accum_dtype}
    """
    check_option("reduction", reduction, LOGP_REDUCTIONS)
    call = prepare_call("hidden", hidden, labels, head=(weight, bias), ignore_index=ignore_index,
                        shift_labels=shift_labels, softcap=softcap, temperature=temperature, backend=backend,
                        chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype, return_entropy=return_entropy)
    out = linear_token_forward(hidden, weight, bias, call.flat_labels, None, call.opts, entropy=bool(return_entropy))
    return _reduced(out, call, labels, reduction, return_entropy)
