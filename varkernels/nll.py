"""The weighted negative log-likelihood: the VAR-agnostic core as a public loss.

For policy rows i = 0 … N−1 with token log-probs lp[i, t] (never materialised as [N, T, V]) and
constant weights w, per sequence [N] or per token [N, T]::

    loss = −(1/N)·Σ_i c_i·Σ_t w[i, t]·lp[i, t]        c_i = 1 ("sum") or 1/n_i ("mean")

n_i is the number of non-ignored tokens of row i; a row with n_i = 0 contributes 0 (never NaN).
A per-sequence weight is the same w_i for every token of its row; per-token weights are indexed
like ``labels`` and shift with them under ``shift_labels=True``. Because the weights do not depend
on the policy, d loss / d lp[i, t] = −w[i, t]·c_i/N is known before the forward: the gradient is
computed during the forward (forward mode of varkernels/core/autograd.py) and backward only rescales
it. Weighted SFT, RAFT / rejection-sampling fine-tuning, advantage-weighted regression and VAR
(varkernels/var/loss.py: VAR weights → this loss) are all this one function.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._docs import compose
from ._prepare import prepare_call
from ._validation import check_inplace, check_options, shift_left
from .core.autograd import linear_token_forward, token_forward
from .logps import sequence_entropy


class NLLOutput(NamedTuple):
    """Result of a weighted-NLL call with ``return_aux=True``.

    Attributes:
        loss: [] float32 scalar, differentiable w.r.t. the policy.
        policy_logps: [B] float32, c_i·Σ_t lp[i, t]: the sequence log-probs reduced like ``reduction``
            (unweighted, detached; 0 for a row without tokens).
        entropy: [B] float32, the policy's mean token entropy per sequence, −Σ_v p_v·log p_v averaged over
            the row's non-ignored tokens whatever ``reduction`` (p: softmax of the transformed logits;
            detached; 0 for a row without tokens). Computed by the token op in the forward sweep the loss
            already makes.
    """

    loss: torch.Tensor
    policy_logps: torch.Tensor
    entropy: torch.Tensor


def sequence_coefficients(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """c_i as [N] fp32: 1 for "sum", 1/n_i for "mean" (1 when n_i = 0: the row's lp are 0 anyway)."""
    if reduction == "sum":
        return torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
    n = (labels != ignore_index).sum(dim=1).clamp(min=1)
    return 1.0 / n.to(torch.float32)


def token_coefficients(
    weights: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str, shift_labels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef [N·T] fp32 = d loss / d lp = −w[i, t]·c_i/N, c [N] fp32); ``labels`` already shifted."""
    N, T = labels.shape
    seq_coef = sequence_coefficients(labels, ignore_index, reduction)
    if weights.dim() == 1:
        coef = (weights.float() * seq_coef).mul_(-1.0 / N).unsqueeze(1).expand(N, T).reshape(-1)
    else:
        w = shift_left(weights.float(), 0.0) if shift_labels else weights.float()  # shifted like the labels
        coef = (w * seq_coef.mul(-1.0 / N).unsqueeze(1)).reshape(-1)
    return coef, seq_coef


def sequence_values(lp: torch.Tensor, seq_coef: torch.Tensor) -> torch.Tensor:
    """policy_logps [N] = c_i·Σ_t lp[i, t] from the core's token log-probs lp [N·T] (detached)."""
    return lp.detach().view(seq_coef.shape[0], -1).sum(dim=1) * seq_coef


def _output(out: tuple, seq_coef: torch.Tensor, call) -> NLLOutput:
    """``NLLOutput`` from the core's (loss, lp, entropy) of a prepared call."""
    loss, lp, ent = out
    return NLLOutput(loss, sequence_values(lp, seq_coef), sequence_entropy(ent, call.labels, call.opts.ignore_index))


@compose
def weighted_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    inplace: bool = False,
    return_aux: bool = False,
    backend: str = "auto",
):
    """Weighted NLL from policy logits, without materialising [B, T, V] log-probabilities.

    loss = −(1/B)·Σ_i c_i·Σ_t w[i, t]·lp[i, t], c_i = 1 ("sum") or 1/n_i ("mean"); see the module docstring.

    Args:
        {logits}
        {labels}
        {weights}
            A weight tensor that requires grad is an error (no gradient flows into the weights: pass
            ``weights.detach()``), and so are NaN and ±inf.
        reduction: "mean" (default: per sequence over its non-ignored tokens) or "sum".
        {shift_labels}
        {transforms}
        {inplace}
        return_aux: return an ``NLLOutput`` (loss, policy_logps [B] reduced like ``reduction``, entropy [B]:
            the per-sequence mean token entropy, from the same sweep).
        {backend}
    Returns:
        float32 scalar loss, or ``NLLOutput``. The logits gradient has the logits' dtype.
        {one_backward}
    """
    check_options(reduction=reduction)
    call = prepare_call("logits", logits, labels, ignore_index=ignore_index, shift_labels=shift_labels,
                        softcap=softcap, temperature=temperature, backend=backend, weights=weights,
                        inplace=inplace, return_aux=return_aux)
    check_inplace(logits, inplace)
    dlp, seq_coef = token_coefficients(weights, call.labels, call.opts.ignore_index, reduction, shift_labels)
    out = token_forward(logits, call.flat_labels, dlp, call.opts, inplace=inplace, entropy=bool(return_aux))
    return _output(out, seq_coef, call) if return_aux else out[0]


@compose
def linear_weighted_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    grad_accum_dtype: torch.dtype = torch.float32,
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_aux: bool = False,
    backend: str = "auto",
):
    """Weighted NLL from the last hidden states and the lm_head weight, never holding [B, T, V] logits.

    Args:
        {hidden}
        {weight}
        labels, weights, reduction and the other keywords: as in :func:`weighted_nll`.
        {chunk_size}
        {grad_accum_dtype}
    Returns:
        float32 scalar loss or ``NLLOutput``. Gradients of hidden, weight (and bias) in their dtypes.
        {one_backward}
        The logits chunks are temporaries, always overwritten by their gradient (no ``inplace`` option).
    """
    check_options(reduction=reduction)
    call = prepare_call("hidden", hidden, labels, head=(weight, bias), ignore_index=ignore_index,
                        shift_labels=shift_labels, softcap=softcap, temperature=temperature, backend=backend,
                        chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype, weights=weights,
                        return_aux=return_aux)
    dlp, seq_coef = token_coefficients(weights, call.labels, call.opts.ignore_index, reduction, shift_labels)
    out = linear_token_forward(hidden, weight, bias, call.flat_labels, dlp, call.opts, entropy=bool(return_aux))
    return _output(out, seq_coef, call) if return_aux else out[0]
