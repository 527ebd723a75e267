"""Fused VAR loss on logits (SPEC §1-3).

Layers: ``token_op`` (kernel launch, ops/token.py) → ``FusedVARLossFunction`` (autograd) →
``fused_var_loss`` (validation, label shift, weights, aux) and ``VARLoss`` (nn.Module).

Because the weights do not depend on the policy, the gradient of the loss w.r.t. the logits,
−(w_i/B)·c_i·(onehot − softmax)·dz/dx, is written during the forward pass; backward only
rescales it by the incoming scalar (skipped when that scalar is exactly 1).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import (
    REDUCTIONS,
    WEIGHTINGS,
    VAROutput,
    check_option,
    check_positive,
)
from ..reference import ess
from .token import prepare_token_call, rne_bf16, token_op
from .weights import var_weights


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """grad *= grad_output in place; skipped when grad_output == 1 (no host sync on GPU)."""
    if backend == "triton" and grad.is_contiguous():
        import triton

        from ..core._triton_kernels import _scale_kernel

        n = grad.numel()
        block = 4096
        _scale_kernel[(triton.cdiv(n, block),)](
            g_ptr=grad, s_ptr=grad_output, N=n, BLOCK=block, RNE_BF16=rne_bf16(grad)
        )
    elif grad_output.device.type == "cpu":
        if grad_output.item() != 1.0:
            grad.mul_(grad_output)
    else:
        grad.mul_(grad_output)
    return grad


def sequence_coefficients(labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """c_i of SPEC §1.3 as [B] fp32: 1 for "sum", 1/n_i for "mean" (1 when n_i = 0: s_i = 0 anyway)."""
    if reduction == "sum":
        return torch.ones(labels.shape[0], dtype=torch.float32, device=labels.device)
    n = (labels != ignore_index).sum(dim=1).clamp(min=1)
    return 1.0 / n.to(torch.float32)


def weighted_sequence_loss(lp: torch.Tensor, seq_coef: torch.Tensor, weights: torch.Tensor):
    """s_i = c_i·Σ_t lp[i, t] from token log-probs [B·T]; loss = −(1/B)·Σ_i w_i·s_i. Returns (loss, s)."""
    B = weights.shape[0]
    s = lp.view(B, -1).sum(dim=1) * seq_coef
    return -(weights * s).sum() / B, s


def pop_stored_grads(ctx, op_name: str) -> tuple:
    """The gradients computed in forward, handed out once: a second backward through the same
    graph raises instead of rescaling them twice."""
    if ctx.grads is None:
        raise RuntimeError(
            f"{op_name}: backward was called twice on one graph; the gradient is computed in the forward "
            "and rescaled in place, so compute the loss again instead of retain_graph=True"
        )
    grads, ctx.grads = ctx.grads, None
    return grads


class FusedVARLossFunction(torch.autograd.Function):
    """loss = −(1/B)·Σ_i w_i·c_i·Σ_t lp[i, t]; the logits gradient is computed in forward."""

    @staticmethod
    def forward(ctx, logits, labels_flat, seq_coef, weights, backend, softcap, temperature, ignore_index, inplace):
        B, T, _ = logits.shape
        need_grad = ctx.needs_input_grad[0]
        row_coef = grad = None
        if need_grad:
            row_coef = (weights * seq_coef / B).repeat_interleave(T)  # d loss / d lp = −w_i·c_i/B
            grad = logits.detach() if inplace else torch.empty_like(logits)
        lp, _ = token_op(
            backend, logits.detach(), labels_flat, row_coef, grad,
            softcap=softcap, temperature=temperature, ignore_index=ignore_index,
        )
        if need_grad and inplace:
            # The kernels write through raw pointers: tell autograd that logits changed, so a node
            # that saved them (e.g. tanh's output) raises instead of using the gradient as logits.
            torch.autograd.graph.increment_version(logits)
        loss, s = weighted_sequence_loss(lp, seq_coef, weights)
        ctx.grads, ctx.backend = (grad,), backend
        ctx.mark_non_differentiable(s)
        return loss, s

    @staticmethod
    def backward(ctx, grad_loss, _grad_s):
        (grad,) = pop_stored_grads(ctx, "fused VAR loss")
        grad = scale_grad_(grad, grad_loss, ctx.backend)
        return grad, None, None, None, None, None, None, None, None


def prepare_policy_call(
    name, x, labels, vocab_size, rewards, ref_logps, *, beta, weighting, logp_reduction,
    ignore_index, shift_labels, softcap, temperature, backend,
):
    """Validation shared by the logits and fused-linear losses. Returns (backend, labels_eff)."""
    check_option("weighting", weighting, WEIGHTINGS)
    check_option("logp_reduction", logp_reduction, REDUCTIONS)
    check_positive("beta", beta)
    return prepare_token_call(
        name, x, labels, vocab_size, ignore_index=ignore_index, shift_labels=shift_labels, softcap=softcap,
        temperature=temperature, backend=backend, rewards=rewards, ref_logps=ref_logps,
    )


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

    loss = −(1/B)·Σ_i w_i·s_i with s_i the (sum or mean) log-prob of response i and
    w_i the stop-gradient VAR weight from rewards and reference log-probs (SPEC §1).

    Args:
        logits: [B, T, V] float32/bfloat16/float16, any strides.
        labels: [B, T] int64/int32; ``ignore_index`` marks prompt and padding.
        rewards: [B, B] with rewards[i, j] = r(x_i, y_j), or [B] (shared-context form).
        ref_logps: same shape as rewards, log π_ref(y_j | x_i) reduced like ``logp_reduction``.
        beta: temperature β > 0 of the optimal policy.
        weighting: "posterior" (default, w ∝ π_ref·exp(r/β), bounded by B) or "importance".
        logp_reduction: "mean" (default, per-token average) or "sum" over non-ignored tokens.
        shift_labels: Hugging Face causal shift (position t predicts labels[:, t+1]); no copy of logits.
        softcap, temperature: logit transforms c·tanh(ℓ/c), then ℓ/τ.
        inplace: overwrite ``logits`` with its gradient (saves a [B, T, V] buffer; destroys logits).
        return_aux: return a ``VAROutput`` (loss, weights, log_z, policy_logps, ess).
        backend: "auto" | "triton" | "cpu" | "torch".
    Returns:
        float32 scalar loss, or ``VAROutput``. The logits gradient has the logits' dtype.
        The graph supports one backward (compute the loss again for a second one).
    """
    V = logits.shape[-1] if isinstance(logits, torch.Tensor) and logits.dim() == 3 else 0
    backend, labels_eff = prepare_policy_call(
        "logits", logits, labels, V, rewards, ref_logps, beta=beta, weighting=weighting,
        logp_reduction=logp_reduction, ignore_index=ignore_index, shift_labels=shift_labels,
        softcap=softcap, temperature=temperature, backend=backend,
    )
    if inplace and any(st == 0 and n > 1 for st, n in zip(logits.stride(), logits.shape)):
        raise ValueError(
            "inplace=True needs logits whose elements do not share memory; got strides "
            f"{tuple(logits.stride())} for shape {tuple(logits.shape)} (an expand()ed view): pass "
            "logits.contiguous() or use inplace=False"
        )
    weights, log_z = var_weights(rewards, ref_logps, beta=beta, weighting=weighting, backend=backend)
    seq_coef = sequence_coefficients(labels_eff, ignore_index, logp_reduction)
    loss, s = FusedVARLossFunction.apply(
        logits, labels_eff.reshape(-1).contiguous(), seq_coef, weights, backend,
        softcap, float(temperature), ignore_index, inplace,
    )
    if not return_aux:
        return loss
    return VAROutput(loss, weights, log_z, s.detach(), ess(weights))


class VARLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`fused_var_loss`; keyword options are fixed at construction."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, logits, labels, rewards, ref_logps, **overrides):
        return fused_var_loss(logits, labels, rewards, ref_logps, **{**self.options, **overrides})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
