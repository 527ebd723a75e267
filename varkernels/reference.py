"""Plain PyTorch VAR loss: docs/design.md §1 written out, readable first, used as the ground truth.

Every kernel in varkernels is tested against these functions. This module imports only the leaves
``_validation`` (shared shape rules and messages) and ``_docs``, never the kernels it checks. They materialise the full
[B, T, V] log-softmax, so they are meant for checking and for small shapes, not for training
(``backend="torch"`` of the public ops is the memory-light PyTorch path).

Computation runs in float32, or in float64 when the inputs are float64 (the tests' ground truth).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._docs import compose
from ._validation import WEIGHTINGS, VAROutput, check_option, importance_overflow_message, pair_form, shifted_labels


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def transform_logits(
    logits: torch.Tensor, softcap: Optional[float] = None, temperature: float = 1.0
) -> torch.Tensor:
    """docs/design.md §1.1: ``softcap`` c → c·tanh(ℓ/c), then ``temperature`` τ → ℓ/τ."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def token_logps_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs lp[i, t] = ℓ[i, t, y] − logsumexp_v ℓ[i, t, v] (docs/design.md §1.2).

    Args:
        logits: [B, T, V]. labels: [B, T] int.
    Returns:
        (lp [B, T] in the compute dtype with 0 at ignored positions, mask [B, T] bool).
    """
    if shift_labels:
        labels = shifted_labels(labels, ignore_index)
    mask = labels != ignore_index
    x = transform_logits(logits.to(_compute_dtype(logits)), softcap, temperature)
    logp = torch.log_softmax(x, dim=-1)
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, torch.zeros_like(lp)), mask


def sequence_logps_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sequence log-probs (docs/design.md §1.3): [B] for "sum"/"mean", [B, T] for "none".

    "mean" divides by the number n_i of non-ignored tokens; a row with n_i = 0 gives 0.
    """
    lp, mask = token_logps_reference(
        logits, labels, ignore_index=ignore_index, shift_labels=shift_labels,
        softcap=softcap, temperature=temperature,
    )
    if reduction == "none":
        return lp
    s = lp.sum(-1)
    if reduction == "mean":
        s = s / mask.sum(-1).clamp(min=1).to(s.dtype)
    return s


def var_weights_reference(
    rewards: torch.Tensor, ref_logps: torch.Tensor, *, beta: float = 1.0, weighting: str = "posterior"
) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/design.md §1.4-1.5: (weights [B], log_z [B]) from rewards/ref_logps, each [B, B] or [B].

    A[i, j] = R[i, j]/β + Q[i, j];  log Ẑ_i = logsumexp_j A[i, j] − log B;
    posterior:  log w_i = A[i, i] − log Ẑ_i;   importance: log w_i = R[i, i]/β − log Ẑ_i.
    The (B,) shared-context form stands for the matrix whose every row is the vector.
    """
    dtype = _compute_dtype(rewards, ref_logps)
    log_w, log_z = var_log_weights(rewards.detach().to(dtype), ref_logps.detach().to(dtype), beta, weighting)
    w = torch.exp(log_w)
    if not torch.isfinite(w).all():
        raise FloatingPointError(importance_overflow_message(weighting))
    return w, log_z


def var_log_weights(R: torch.Tensor, Q: torch.Tensor, beta: float, weighting: str):
    """(log w [B], log Ẑ [B]) in the dtype of R and Q, no checks: the maths of docs/design.md §1.4-1.5."""
    B = R.shape[0]
    if R.dim() == 1:
        R, Q = R.unsqueeze(0).expand(B, B), Q.unsqueeze(0).expand(B, B)
    A = R / beta + Q
    log_z = torch.logsumexp(A, dim=-1) - math.log(B)
    if weighting == "posterior":
        return A.diagonal() - log_z, log_z
    check_option("weighting", weighting, WEIGHTINGS)
    return R.diagonal() / beta - log_z, log_z


def ess(weights: torch.Tensor) -> torch.Tensor:
    """Effective sample size (Σw)² / Σw² of [B] weights."""
    return weights.sum() ** 2 / (weights * weights).sum()


def var_loss_reference(
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
    return_aux: bool = False,
):
    """VAR loss of docs/design.md §1: loss = −(1/B)·Σ_i w_i·s_i per group, with stop-gradient weights;
    for k groups the mean of the k group losses.

    Args:
        logits: [k·B, T, V] policy logits. labels: [k·B, T].
        rewards: [B, B] (R[i, j] = r(x_i, y_j)) or [B]; for k groups [k, B, B] or [k, B].
        ref_logps: same shape as rewards.
    Returns:
        scalar loss (float32, or float64 for float64 inputs), or a ``VAROutput`` (weights, log_z,
        policy_logps of all k·B rows; ess the mean of the groups' ESS).
    """
    s = sequence_logps_reference(
        logits, labels, reduction=logp_reduction, ignore_index=ignore_index,
        shift_labels=shift_labels, softcap=softcap, temperature=temperature,
    )
    k, B, cross = pair_form("rewards", rewards, s.shape[0])
    R = rewards.reshape((k, B, B) if cross else (k, B))
    Q = ref_logps.reshape(R.shape)
    losses, ws, log_zs, esss = [], [], [], []
    for g in range(k):
        w, log_z = var_weights_reference(R[g], Q[g], beta=beta, weighting=weighting)
        s_g = s[g * B : (g + 1) * B]
        losses.append(-(w.to(s.dtype) * s_g).sum() / B)
        ws.append(w)
        log_zs.append(log_z)
        esss.append(ess(w))
    loss = torch.stack(losses).mean() if k > 1 else losses[0]
    if not return_aux:
        return loss
    return VAROutput(loss, torch.cat(ws), torch.cat(log_zs), s.detach(), torch.stack(esss).mean())


def linear_var_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    **kwargs,
):
    """VAR loss from hidden states [B, T, H] and an lm_head weight [V, H] (+ bias [V])."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return var_loss_reference(logits, labels, rewards, ref_logps, **kwargs)


def linear_sequence_logps_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias=None, **kwargs
) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return sequence_logps_reference(logits, labels, **kwargs)


@compose
def weighted_nll_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    shift_labels: bool = False,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    return_aux: bool = False,
):
    """Weighted NLL: loss = −(1/B)·Σ_i c_i·Σ_t w[i, t]·lp[i, t], c_i = 1 ("sum") or 1/n_i ("mean").

    Args:
        logits: [B, T, V].
        {labels}
        {weights}
    Returns:
        scalar loss (float32, or float64 for float64 inputs), or ``(loss, policy_logps)`` with
        policy_logps [B] = c_i·Σ_t lp[i, t] (detached, unweighted). Weights that require grad are detached
        here; ``weighted_nll`` rejects them.
    """
    lp, mask = token_logps_reference(
        logits, labels, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature,
    )
    w = weights.detach().to(lp.dtype)
    if w.dim() == 1:
        w = w.unsqueeze(1).expand_as(lp)
    elif shift_labels:
        w = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], dim=1)
    n = mask.sum(-1).to(lp.dtype)
    c = torch.ones_like(n) if reduction == "sum" else 1.0 / n.clamp(min=1)
    loss = -(c * (w * lp).sum(-1)).sum() / lp.shape[0]
    if not return_aux:
        return loss
    return loss, (c * lp.sum(-1)).detach()


def linear_weighted_nll_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, bias=None, **kwargs
):
    """Weighted NLL from hidden states [N, T, H] and an lm_head weight [V, H] (+ bias [V]).

    The logits are ``F.linear(hidden, weight, bias)``, as an ``nn.Linear`` head computes them: in 16-bit
    dtypes the bias is added before the one rounding to the logits' dtype."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return weighted_nll_reference(logits, labels, weights, **kwargs)
