"""The VAR loss: VAR weights → the weighted NLL (varkernels/nll.py).

rewards and reference log-probs → per-sequence weights w (varkernels/var/weights.py) → the
weighted NLL with ``reduction=logp_reduction`` over the N = k·B rows: loss = −(1/N)·Σ_i w_i·s_i =
−(1/k)·Σ_g (1/B)·Σ_{i in g} w_i·s_i, its gradient computed in the same pass. The weights do not
depend on the policy, which is what lets the gradient be computed during the forward.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from .._validation import VAROutput, check_call, check_inplace, check_linear, check_option, check_positive
from ..nll import linear_nll_forward, nll_forward, sequence_values
from .weights import group_ess, var_weights


def _var_weights(checked, rewards, ref_logps, *, beta, weighting):
    """(weights [k·B], log_z [k·B]) fp32 of an already checked call."""
    return var_weights(
        rewards, ref_logps, groups=checked.groups, group_size=checked.group_size,
        cross_pairs=checked.cross_pairs, beta=beta, weighting=weighting, backend=checked.backend,
    )


def _output(loss, lp, seq_coef, weights, log_z, groups, return_aux):
    if not return_aux:
        return loss
    return VAROutput(loss, weights, log_z, sequence_values(lp, seq_coef), group_ess(weights, groups))


def fused_var_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 1.0,
    weighting: str = "posterior",
    logp_reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    inplace: bool = False,
    return_aux: bool = False,
    backend: str = "auto",
):
    """VAR loss from policy logits, without materialising [B, T, V] log-probabilities.

    loss = −(1/k)·Σ_g (1/B)·Σ_i w_i·s_i with s_i the (sum or mean) log-prob of response i and
    w_i the stop-gradient VAR weight of row i inside its group g (docs/design.md §1).

    Args:
        logits: [k·B, T, V] float32/bfloat16/float16, any strides.
        labels: [k·B, T] int64/int32; ``ignore_index`` marks prompt and padding.
        rewards: [B, B] with rewards[i, j] = r(x_i, y_j), or [B] (shared-context form); for k
            groups [k, B, B] or [k, B] (each group normalised inside itself).
        ref_logps: same shape as rewards, log π_ref(y_j | x_i) reduced like ``logp_reduction``.
        beta: temperature β > 0 of the optimal policy.
        weighting: "posterior" (default, w ∝ π_ref·exp(r/β), bounded by B) or "importance".
        logp_reduction: "mean" (default, per-token average) or "sum" over non-ignored tokens.
        shift_labels: Hugging Face causal shift (position t predicts labels[:, t+1]); no copy of logits.
        softcap, temperature: logit transforms c·tanh(ℓ/c), then ℓ/τ.
        inplace: overwrite ``logits`` with its gradient (saves a [B, T, V] buffer; destroys logits).
            Nothing is written under ``torch.no_grad()``.
        return_aux: return a ``VAROutput`` (loss, weights, log_z, policy_logps, ess).
        backend: "auto" | "triton" | "cpu" | "torch".
    Returns:
        float32 scalar loss, or ``VAROutput``. The logits gradient has the logits' dtype.
        The graph supports one backward (compute the loss again for a second one).
    """
    V = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 3 else 0
    checked = check_call(
        "logits", logits, labels, V, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature, backend=backend, rewards=rewards, ref_logps=ref_logps, beta=beta,
        weighting=weighting, logp_reduction=logp_reduction,
    )
    check_inplace(logits, inplace)
    weights, log_z = _var_weights(checked, rewards, ref_logps, beta=beta, weighting=weighting)
    loss, lp, seq_coef = nll_forward(
        checked, logits, weights, reduction=logp_reduction, ignore_index=ignore_index, shift_labels=shift_labels,
        softcap=softcap, temperature=temperature, inplace=inplace,
    )
    return _output(loss, lp, seq_coef, weights, log_z, checked.groups, return_aux)


def fused_linear_var_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    grad_accum_dtype: torch.dtype = torch.float32,
    beta: float = 1.0,
    weighting: str = "posterior",
    logp_reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_aux: bool = False,
    backend: str = "auto",
):
    """VAR loss from the last hidden states and the lm_head weight, never holding [B, T, V] logits.

    Args:
        hidden: [k·B, T, H] float32/bfloat16/float16, any strides (never copied, also with shift_labels).
        weight: [V, H] as ``lm_head.weight``, dtype of hidden. bias: [V] or None (keyword-only).
        labels, rewards, ref_logps and the other keywords: as in :func:`fused_var_loss` (k groups in
            one call share one fp32 weight-gradient accumulator).
        chunk_size: token rows per chunk; default ``default_chunk_size(V, device, dtype)`` (a 32 MiB
            block of fp32 logits on CPU, 256 MiB of logits in their dtype on CUDA).
        grad_accum_dtype: dtype of the weight/bias gradient accumulators: torch.float32 (default:
            rounded once, at the end) or the weight's dtype (V·H·2 bytes less for bf16/fp16 weights,
            one rounding per chunk; README gives the measured error).
    Returns:
        float32 scalar loss or ``VAROutput``. Gradients of hidden, weight and bias are computed in the
        forward (weight/bias accumulated in fp32, returned in their dtype); one backward per graph.
        The logits chunks are temporaries, always overwritten by their gradient (no ``inplace`` option).
    """
    V = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    check_linear(hidden, weight, bias, chunk_size, grad_accum_dtype)
    checked = check_call(
        "hidden", hidden, labels, V, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature, backend=backend, rewards=rewards, ref_logps=ref_logps, beta=beta,
        weighting=weighting, logp_reduction=logp_reduction,
    )
    weights, log_z = _var_weights(checked, rewards, ref_logps, beta=beta, weighting=weighting)
    loss, lp, seq_coef = linear_nll_forward(
        checked, hidden, weight, bias, weights, reduction=logp_reduction, ignore_index=ignore_index,
        shift_labels=shift_labels, softcap=softcap, temperature=temperature, chunk_size=chunk_size,
        grad_accum_dtype=grad_accum_dtype,
    )
    return _output(loss, lp, seq_coef, weights, log_z, checked.groups, return_aux)


_VAR_OPTIONS = [
    name for name, p in inspect.signature(fused_var_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
]


class VARLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_var_loss`; keyword options are checked at construction.

    ``VARLoss(beta=0.5, logp_reduction="sum")(logits, labels, rewards, ref_logps)``.
    """

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(_VAR_OPTIONS))
        if unknown:
            raise TypeError(f"VARLoss got unknown options {unknown}; expected some of {_VAR_OPTIONS}")
        if "beta" in options:
            check_positive("beta", options["beta"])
        if "temperature" in options:
            check_positive("temperature", options["temperature"])
        if "softcap" in options:
            check_positive("softcap", options["softcap"], allow_none=True)
        from .._validation import BACKENDS, REDUCTIONS, WEIGHTINGS

        for name, allowed in (("weighting", WEIGHTINGS), ("logp_reduction", REDUCTIONS), ("backend", BACKENDS)):
            if name in options:
                check_option(name, options[name], allowed)
        self.options = options

    def forward(self, logits, labels, rewards, ref_logps, **overrides):
        return fused_var_loss(logits, labels, rewards, ref_logps, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
