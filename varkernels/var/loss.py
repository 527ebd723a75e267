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

from .._docs import compose
from .._prepare import prepare_call
from .._validation import VAROutput, check_inplace, check_options
from ..core.autograd import linear_token_forward, token_forward
from ..nll import sequence_values, token_coefficients
from .weights import group_ess, var_weights


def _var_weights(call, rewards, ref_logps, *, beta, weighting):
    """(weights [k·B], log_z [k·B]) fp32 of a prepared call."""
    return var_weights(
        rewards, ref_logps, groups=call.groups, group_size=call.group_size,
        cross_pairs=call.cross_pairs, beta=beta, weighting=weighting, backend=call.backend,
    )


def _output(loss, lp, seq_coef, weights, log_z, groups, return_aux):
    if not return_aux:
        return loss
    return VAROutput(loss, weights, log_z, sequence_values(lp, seq_coef), group_ess(weights, groups))


@compose
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
        {logits}
        {labels}
        rewards: [B, B] with rewards[i, j] = r(x_i, y_j), or [B] (shared-context form); for k
            groups [k, B, B] or [k, B] (each group normalised inside itself).
        ref_logps: same shape as rewards, log π_ref(y_j | x_i) reduced like ``logp_reduction``.
        beta: temperature β > 0 of the optimal policy.
        weighting: "posterior" (default, w ∝ π_ref·exp(r/β), bounded by B) or "importance".
        logp_reduction: "mean" (default, per-token average) or "sum" over non-ignored tokens.
        {shift_labels}
        {transforms}
        {inplace}
        return_aux: return a ``VAROutput`` (loss, weights, log_z, policy_logps, ess).
        {backend}
    Returns:
        float32 scalar loss, or ``VAROutput``. The logits gradient has the logits' dtype.
        {one_backward}
    Here B is k·B: k groups of B rows in one call.
    """
    check_options(weighting=weighting, logp_reduction=logp_reduction, beta=beta)
    call = prepare_call("logits", logits, labels, ignore_index=ignore_index, shift_labels=shift_labels,
                        softcap=softcap, temperature=temperature, backend=backend, rewards=rewards,
                        ref_logps=ref_logps, inplace=inplace, return_aux=return_aux)
    check_inplace(logits, inplace)
    weights, log_z = _var_weights(call, rewards, ref_logps, beta=beta, weighting=weighting)
    dlp, seq_coef = token_coefficients(weights, call.labels, call.opts.ignore_index, logp_reduction, shift_labels)
    loss, lp = token_forward(logits, call.flat_labels, dlp, call.opts, inplace=inplace)
    return _output(loss, lp, seq_coef, weights, log_z, call.groups, return_aux)


@compose
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
        {hidden}
        {weight}
        labels, rewards, ref_logps and the other keywords: as in :func:`fused_var_loss` (k groups in
            one call share one fp32 weight-gradient accumulator).
        {chunk_size}
        {grad_accum_dtype}
    Returns:
        float32 scalar loss or ``VAROutput``. Gradients of hidden, weight and bias are computed in the
        forward (weight/bias accumulated in fp32, returned in their dtype); one backward per graph.
        The logits chunks are temporaries, always overwritten by their gradient (no ``inplace`` option).
    """
    check_options(weighting=weighting, logp_reduction=logp_reduction, beta=beta)
    call = prepare_call("hidden", hidden, labels, head=(weight, bias), ignore_index=ignore_index,
                        shift_labels=shift_labels, softcap=softcap, temperature=temperature, backend=backend,
                        chunk_size=chunk_size, grad_accum_dtype=grad_accum_dtype, rewards=rewards,
                        ref_logps=ref_logps, return_aux=return_aux)
    weights, log_z = _var_weights(call, rewards, ref_logps, beta=beta, weighting=weighting)
    dlp, seq_coef = token_coefficients(weights, call.labels, call.opts.ignore_index, logp_reduction, shift_labels)
    loss, lp = linear_token_forward(hidden, weight, bias, call.flat_labels, dlp, call.opts)
    return _output(loss, lp, seq_coef, weights, log_z, call.groups, return_aux)


_VAR_OPTIONS = [
    name for name, p in inspect.signature(fused_var_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
]


class VARLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_var_loss`; keyword options are checked at construction (every one,
    with the rules of the call: ``VARLoss(inplace="yes")`` is a TypeError), and again by each call.

    ``VARLoss(beta=0.5, logp_reduction="sum")(logits, labels, rewards, ref_logps)``.
    """

    def __init__(self, **options):
        super().__init__()
        unknown = sorted(set(options) - set(_VAR_OPTIONS))
        if unknown:
            raise TypeError(f"VARLoss got unknown options {unknown}; expected some of {_VAR_OPTIONS}")
        check_options(**options)
        self.options = options

    def forward(self, logits, labels, rewards, ref_logps, **overrides):
        return fused_var_loss(logits, labels, rewards, ref_logps, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
