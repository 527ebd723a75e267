"""Fused-linear VAR loss and log-probs: from hidden states and the lm_head weight, never [B, T, V].

Driver (SPEC §3): the non-ignored token rows are compacted first (prompt tokens cost nothing),
then processed in chunks of ``chunk_size`` rows:

    logits_c  = h_c · Wᵀ (+ b)                       # torch.matmul, [chunk, V] in h's dtype
    g_c       = token_op(logits_c, in place)         # coef·(softmax − onehot)·dz/dx
    grad_h_c  = g_c · W                              # written to the compacted rows of grad_hidden
    grad_W   += g_cᵀ · h_c   (fp32)                  # fixed chunk order: deterministic
    grad_b   += Σ_rows g_c   (fp32)

Extra memory is O(chunk·V + V·H): one logits chunk plus the fp32 weight-gradient accumulator.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._common import FLOAT_DTYPES, LOGP_REDUCTIONS, VAROutput, check_option, check_same_device
from ..reference import ess
from .logps import reduce_token_logps
from .token import prepare_token_call, token_op
from .var_loss import (
    pop_stored_grads,
    prepare_policy_call,
    scale_grad_,
    sequence_coefficients,
    weighted_sequence_loss,
)
from .weights import var_weights

# Memory budget of one [chunk, V] logits block, counted in fp32 bytes. CPU: 32 MiB keeps the
# extra memory of the loss at ~0.2x naive's at B=4, T=512, V=32000 (benchmarks/bench_fused_linear.py)
# while a 262-row matmul still runs at full speed. CUDA: 256 MiB, so the three matmuls stay large
# enough for the tensor cores (e.g. 523 rows at V = 128256).
CHUNK_BUDGET_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
MIN_CHUNK_ROWS = 16


def default_chunk_size(vocab_size: int, device_type: str = "cpu") -> int:
    """Rows per chunk from ``CHUNK_BUDGET_BYTES``: 262 rows at V = 32000 on CPU, 523 at V = 128256 on CUDA."""
    budget = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cpu"])
    return max(MIN_CHUNK_ROWS, budget // (4 * vocab_size))


def _check_linear(hidden, weight, bias, chunk_size):
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if hidden.dim() != 3 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape [B, T, H] with H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )
    if weight.dtype not in FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {got}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_same_device(hidden=hidden, weight=weight, bias=bias)


def linear_token_pass(
    hidden, weight, bias, labels_flat, *, coef=None, lse_in=None, want=(False, False, False),
    backend, softcap, temperature, ignore_index, chunk_size,
):
    """One chunked pass over the non-ignored rows.

    Returns (lp [N] fp32, lse [N] fp32, grad_hidden | None, grad_weight fp32 | None,
    grad_bias fp32 | None); gradients only for the inputs flagged in ``want`` (and only when
    ``coef`` is given).
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    lp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    has_grad = coef is not None and any(want)
    gh = torch.zeros_like(hidden) if has_grad and want[0] else None
    gw = torch.zeros(V, H, dtype=torch.float32, device=dev) if has_grad and want[1] else None
    gb = torch.zeros(V, dtype=torch.float32, device=dev) if has_grad and want[2] and bias is not None else None
    idx = torch.nonzero(labels_flat != ignore_index).squeeze(1)  # compacted rows (one host sync)
    chunk = chunk_size or default_chunk_size(V, dev.type)
    w_t = weight.t()
    for c0 in range(0, idx.numel(), chunk):
        i_c = idx[c0 : c0 + chunk]
        b_c, t_c = i_c // T, i_c % T
        h_c = hidden[b_c, t_c]  # [n, H] gathered rows, no copy of the whole hidden
        logits_c = torch.addmm(bias, h_c, w_t) if bias is not None else h_c @ w_t
        x = logits_c.unsqueeze(0)
        lp_c, lse_c = token_op(
            backend, x, labels_flat[i_c].contiguous(),
            coef[i_c].contiguous() if has_grad else None, x if has_grad else None,
            lse_in[i_c].contiguous() if lse_in is not None else None,
            softcap=softcap, temperature=temperature, ignore_index=ignore_index,
        )
        lp[i_c], lse[i_c] = lp_c, lse_c
        if not has_grad:
            continue
        g = logits_c  # now holds the gradient w.r.t. the logits chunk
        if gh is not None:
            gh[b_c, t_c] = g @ weight
        if gw is not None:
            if g.dtype == torch.float32:
                gw.addmm_(g.t(), h_c)
            else:
                gw.addmm_(g.t().float(), h_c.float())
        if gb is not None:
            gb += g.float().sum(dim=0)
    return lp, lse, gh, gw, gb


class FusedLinearVARLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels_flat, seq_coef, weights, backend, softcap,
                temperature, ignore_index, chunk_size):
        B, T, _ = hidden.shape
        want = tuple(ctx.needs_input_grad[:3])
        coef = (weights * seq_coef / B).repeat_interleave(T) if any(want) else None
        lp, _, gh, gw, gb = linear_token_pass(
            hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, labels_flat,
            coef=coef, want=want, backend=backend, softcap=softcap, temperature=temperature,
            ignore_index=ignore_index, chunk_size=chunk_size,
        )
        loss, s = weighted_sequence_loss(lp, seq_coef, weights)
        # grad_weight / grad_bias stay in their fp32 accumulators until backward, so the upstream
        # scale is applied before the single rounding to the parameter dtype.
        ctx.grads = (gh, gw, gb)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.backend = backend
        ctx.mark_non_differentiable(s)
        return loss, s

    @staticmethod
    def backward(ctx, grad_loss, _grad_s):
        grads = pop_stored_grads(ctx, "fused-linear VAR loss")
        gh, gw, gb = (
            scale_grad_(g, grad_loss, ctx.backend).to(dt) if g is not None else None
            for g, dt in zip(grads, ctx.dtypes)
        )
        return gh, gw, gb, None, None, None, None, None, None, None, None


def fused_linear_var_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
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
    """VAR loss from the last hidden states and the lm_head weight, never holding [B, T, V] logits.

    Args:
        hidden: [B, T, H] float32/bfloat16/float16, any strides (never copied, also with shift_labels).
        weight: [V, H] as ``lm_head.weight``, dtype of hidden. bias: [V] or None.
        labels, rewards, ref_logps and the keywords: as in :func:`fused_var_loss`.
        chunk_size: token rows per chunk; default ``default_chunk_size(V, device)`` (a 32 MiB fp32
            logits block on CPU, 256 MiB on CUDA).
        inplace: accepted for API symmetry; the logits chunks are always overwritten in place here.
    Returns:
        float32 scalar loss or ``VAROutput``. Gradients of hidden, weight and bias are computed in the
        forward (weight/bias accumulated in fp32, returned in their dtype); one backward per graph.
    """
    V = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else 0
    _check_linear(hidden, weight, bias, chunk_size)
    backend, labels_eff = prepare_policy_call(
        "hidden", hidden, labels, V, rewards, ref_logps, beta=beta, weighting=weighting,
        logp_reduction=logp_reduction, ignore_index=ignore_index, shift_labels=shift_labels,
        softcap=softcap, temperature=temperature, backend=backend,
    )
    weights, log_z = var_weights(rewards, ref_logps, beta=beta, weighting=weighting, backend=backend)
    seq_coef = sequence_coefficients(labels_eff, ignore_index, logp_reduction)
    loss, s = FusedLinearVARLossFunction.apply(
        hidden, weight, bias, labels_eff.reshape(-1).contiguous(), seq_coef, weights, backend,
        softcap, float(temperature), ignore_index, chunk_size,
    )
    if not return_aux:
        return loss
    return VAROutput(loss, weights, log_z, s.detach(), ess(weights))


class LinearTokenLogpsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels_flat, backend, softcap, temperature, ignore_index,
                chunk_size, save):
        B, T, _ = hidden.shape
        opts = dict(backend=backend, softcap=softcap, temperature=temperature, ignore_index=ignore_index,
                    chunk_size=chunk_size)
        lp, lse, *_ = linear_token_pass(
            hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, labels_flat, **opts
        )
        if save:
            ctx.save_for_backward(hidden, weight, bias, labels_flat, lse)
        ctx.opts = opts
        return lp.view(B, T)

    @staticmethod
    def backward(ctx, grad_lp):
        hidden, weight, bias, labels_flat, lse = ctx.saved_tensors
        coef = grad_lp.reshape(-1).to(torch.float32).neg().contiguous()
        _, _, gh, gw, gb = linear_token_pass(
            hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, labels_flat,
            coef=coef, lse_in=lse, want=tuple(ctx.needs_input_grad[:3]), **ctx.opts,
        )
        gw = gw.to(weight.dtype) if gw is not None else None
        gb = gb.to(bias.dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None


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
    backend: str = "auto",
) -> torch.Tensor:
    """Log-probs of ``labels`` from hidden states [B, T, H] and lm_head weight [V, H] (+ bias [V]).

    Differentiable w.r.t. hidden, weight and bias; the forward saves only the per-token
    logsumexp, the backward recomputes each logits chunk. Under ``torch.no_grad()`` nothing is
    saved (reference scoring). Returns float32 [B] ("mean"/"sum") or [B, T] ("none").
    """
    check_option("reduction", reduction, LOGP_REDUCTIONS)
    _check_linear(hidden, weight, bias, chunk_size)
    backend, labels_eff = prepare_token_call(
        "hidden", hidden, labels, weight.shape[0], ignore_index=ignore_index, shift_labels=shift_labels,
        softcap=softcap, temperature=temperature, backend=backend,
    )
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    lp = LinearTokenLogpsFunction.apply(
        hidden, weight, bias, labels_eff.reshape(-1).contiguous(), backend, softcap, float(temperature),
        ignore_index, chunk_size, save,
    )
    return reduce_token_logps(lp, labels_eff, ignore_index, reduction)
