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

from ._validation import REDUCTIONS, check_call, check_inplace, check_linear, check_option
from .core.autograd import linear_token_forward, token_forward
from .core.linear import default_chunk_size


class NLLOutput(NamedTuple):
    """Result of a weighted-NLL call with ``return_aux=True``.

    Attributes:
        loss: [] float32 scalar, differentiable w.r.t. the policy.
        policy_logps: [N] float32, c_i·Σ_t lp[i, t]: the sequence log-probs reduced like ``reduction``
            (unweighted, detached; 0 for a row without tokens).
    """

    loss: torch.Tensor
    policy_logps: torch.Tensor


def sequence_coefficients(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """c_i as [N] fp32: 1 for "sum", 1/n_i for "mean" (1 when n_i = 0: the row's lp are 0 anyway)."""
    if reduction == "sum":
        return torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
    n = (labels != ignore_index).sum(dim=1).clamp(min=1)
    return 1.0 / n.to(torch.float32)


def shifted_weights(weights: torch.Tensor) -> torch.Tensor:
    """Per-token weights [N, T] shifted like the labels: position t gets weights[:, t+1], the last 0."""
    out = torch.zeros_like(weights)
    out[:, :-1] = weights[:, 1:]
    return out


def token_coefficients(
    weights: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str, shift_labels: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef [N·T] fp32 = d loss / d lp = −w[i, t]·c_i/N, c [N] fp32); ``labels`` already shifted."""
    N, T = labels.shape
    seq_coef = sequence_coefficients(labels, ignore_index, reduction)
    if weights.dim() == 1:
        coef = (weights.float() * seq_coef).mul_(-1.0 / N).unsqueeze(1).expand(N, T).reshape(-1)
    else:
        w = shifted_weights(weights.float()) if shift_labels else weights.float()
        coef = (w * seq_coef.mul(-1.0 / N).unsqueeze(1)).reshape(-1)
    return coef, seq_coef


def sequence_values(lp: torch.Tensor, seq_coef: torch.Tensor) -> torch.Tensor:
    """policy_logps [N] = c_i·Σ_t lp[i, t] from the core's token log-probs lp [N·T] (detached)."""
    return lp.detach().view(seq_coef.shape[0], -1).sum(dim=1) * seq_coef


def nll_forward(checked, logits, weights, *, reduction, ignore_index, shift_labels, softcap, temperature,
                inplace):
    """(loss, lp [N·T], c [N]) of the logits form, on an already checked call (VAR enters here)."""
    coef, seq_coef = token_coefficients(weights, checked.labels, ignore_index, reduction, shift_labels)
    loss, lp = token_forward(
        logits, checked.labels.reshape(-1).contiguous(), coef, backend=checked.backend, softcap=softcap,
        inv_temperature=1.0 / float(temperature), ignore_index=ignore_index, inplace=inplace,
    )
    return loss, lp, seq_coef


def linear_nll_forward(checked, hidden, weight, bias, weights, *, reduction, ignore_index, shift_labels, softcap,
                       temperature, chunk_size, grad_accum_dtype):
    """(loss, lp [N·T], c [N]) of the fused-linear form, on an already checked call (VAR enters here)."""
    coef, seq_coef = token_coefficients(weights, checked.labels, ignore_index, reduction, shift_labels)
    V = weight.shape[0]
    loss, lp = linear_token_forward(
        hidden, weight, bias, checked.labels.reshape(-1).contiguous(), coef, backend=checked.backend,
        softcap=softcap, inv_temperature=1.0 / float(temperature), ignore_index=ignore_index,
        chunk_size=chunk_size or default_chunk_size(V, hidden.device.type, hidden.element_size()),
        accum_fp32=grad_accum_dtype == torch.float32,
    )
    return loss, lp, seq_coef


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
    """Weighted NLL from policy logits, without materialising [N, T, V] log-probabilities.

    loss = −(1/N)·Σ_i c_i·Σ_t w[i, t]·lp[i, t], c_i = 1 ("sum") or 1/n_i ("mean"); see the module docstring.

    Args:
        logits: [N, T, V] float32/bfloat16/float16, any strides (never copied, also with shift_labels).
        labels: [N, T] int64/int32; ``ignore_index`` marks prompt and padding.
        weights: [N] (per sequence) or [N, T] (per token, indexed like labels and shifted with them),
            float; constants: a tensor that requires grad is an error (pass ``weights.detach()``).
            Any sign; NaN/±inf are an error.
        reduction: "mean" (default: per sequence over its non-ignored tokens) or "sum".
        shift_labels: Hugging Face causal shift (position t predicts labels[:, t+1]); no copy of logits.
        softcap, temperature: logit transforms c·tanh(ℓ/c), then ℓ/τ.
        inplace: overwrite ``logits`` with its gradient (saves a [N, T, V] buffer; destroys logits).
            Nothing is written under ``torch.no_grad()``.
        return_aux: return an ``NLLOutput`` (loss, policy_logps [N] reduced like ``reduction``).
        backend: "auto" | "triton" | "cpu" | "torch".
    Returns:
        float32 scalar loss, or ``NLLOutput``. The logits gradient has the logits' dtype; it is computed
        in the forward, so the graph supports one backward.
    """
    check_option("reduction", reduction, REDUCTIONS)
    V = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 3 else 0
    checked = check_call(
        "logits", logits, labels, V, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature, backend=backend, weights=weights,
    )
    check_inplace(logits, inplace)
    loss, lp, seq_coef = nll_forward(
        checked, logits, weights, reduction=reduction, ignore_index=ignore_index, shift_labels=shift_labels,
        softcap=softcap, temperature=temperature, inplace=inplace,
    )
    return NLLOutput(loss, sequence_values(lp, seq_coef)) if return_aux else loss


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
    """Weighted NLL from the last hidden states and the lm_head weight, never holding [N, T, V] logits.

    Args:
        hidden: [N, T, H] float32/bfloat16/float16, any strides (never copied, also with shift_labels).
        weight: [V, H] as ``lm_head.weight``, dtype of hidden. bias: [V] or None.
        labels, weights, reduction and the other keywords: as in :func:`weighted_nll`.
        chunk_size: token rows per chunk; default ``default_chunk_size(V, device, dtype)``.
        grad_accum_dtype: dtype of the weight/bias gradient accumulators: torch.float32 (default) or the
            weight's dtype.
    Returns:
        float32 scalar loss or ``NLLOutput``. Gradients of hidden, weight and bias are computed in the
        forward; one backward per graph. The logits chunks are temporaries (no ``inplace`` option).
    """
    check_option("reduction", reduction, REDUCTIONS)
    V = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    check_linear(hidden, weight, bias, chunk_size, grad_accum_dtype)
    checked = check_call(
        "hidden", hidden, labels, V, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature, backend=backend, weights=weights,
    )
    loss, lp, seq_coef = linear_nll_forward(
        checked, hidden, weight, bias, weights, reduction=reduction, ignore_index=ignore_index,
        shift_labels=shift_labels, softcap=softcap, temperature=temperature, chunk_size=chunk_size,
        grad_accum_dtype=grad_accum_dtype,
    )
    return NLLOutput(loss, sequence_values(lp, seq_coef)) if return_aux else loss
