"""Autograd for the token op: one path for the logits form, one for the fused-linear form.

Each path has two gradient modes, chosen by the layer above:

* **forward mode** (``dlp`` given, [B·T] fp32): the caller knows d value / d lp[n] = dlp[n] before
  the forward (true of any loss Σ_n dlp[n]·lp[n] whose coefficients do not depend on the policy,
  e.g. VAR's stop-gradient weights). The op returns value = Σ_n dlp[n]·lp[n] and computes its
  gradient during the forward; backward only rescales it by the incoming scalar (skipped when that
  is exactly 1). One pass over the vocabulary less than recomputing, and ``inplace`` can write the
  gradient over the logits.
* **backward mode** (``dlp=None``): the op returns differentiable token log-probs lp; the forward
  saves only the per-token logsumexp, and backward recomputes softmax with dlp = grad_lp (for
  DPO-style losses and anything whose coefficients depend on lp).

Both return ``(value, lp)``: value is a differentiable fp32 scalar in forward mode (0 otherwise),
lp [B·T] fp32 is differentiable in backward mode (detached in forward mode). Asked for the entropy
(``entropy=True``), they return ``(value, lp, entropy)``: entropy [B·T] fp32, −Σ_v p_v·log p_v of each
token row's softmax of the transformed logits (0 for ignored rows), no gradient, written by the token op
in the forward's logsumexp sweep (either mode: both forwards make that sweep).

Grad mode: the gradient is computed and kept only when grad mode is on and an input requires grad
(``needs_grad``, decided by the caller outside the Function, where grad mode is visible). Under
``torch.no_grad()`` / ``inference_mode()`` no gradient buffer is allocated, nothing is saved and
``inplace`` writes nothing.

Forward mode keeps one backward per graph: the gradient is saved as a tensor and rescaled in place,
so a second backward through the same graph raises instead of rescaling it twice.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch.library import triton_op

from .._env import on_triton_ops
from . import linear_cpu
from ._grad_buffers import grad_buffer_like
from .linear import _linear_token_pass_op  # noqa: F401 - registers varkernels::linear_token_pass
from .token import TokenOptions, kernel_coef, require_cpu_op, rne_bf16, token_kernel

# ---------------------------------------------------------------------------------- scaling


def scale_triton_launch(g: torch.Tensor, s: torch.Tensor) -> None:
    """g *= s[0] in place on the GPU, a no-op without a host sync when s == 1."""
    import triton

    from ._triton_kernels import _scale_kernel

    n = g.numel()
    block = 4096
    grid = (triton.cdiv(n, block),)
    torch.library.wrap_triton(_scale_kernel)[grid](g_ptr=g, s_ptr=s, N=n, BLOCK=block, RNE_BF16=rne_bf16(g))


def _register_scale_triton() -> None:
    op = triton_op("varkernels::scale_triton", mutates_args={"g"})(scale_triton_launch)  # imports triton
    op.register_fake(lambda g, s: None)


on_triton_ops(_register_scale_triton)  # registered on first use (varkernels._env.load_triton_ops)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """grad · grad_output: in place and skipped when grad_output == 1 in eager mode (no host sync
    on GPU); a plain product under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return grad * grad_output
    if backend == "triton" and grad.is_contiguous():
        torch.ops.varkernels.scale_triton(grad, grad_output)  # registered: the call resolved to "triton"
        # written through a raw pointer: bump the version so that a second backward through the
        # graph (retain_graph=True) finds its saved gradient modified and raises
        torch.autograd.graph.increment_version(grad)
    elif grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        torch.autograd.graph.increment_version(grad)  # as if scaled: one backward per graph
    else:
        grad.mul_(grad_output)
    return grad


def _saved_once(ctx, op_name: str) -> tuple:
    """ctx.saved_tensors, with a message that says what a second backward means here."""
    if torch.compiler.is_compiling():
        return ctx.saved_tensors
    try:
        return ctx.saved_tensors
    except RuntimeError as e:
        raise RuntimeError(
            f"{op_name}: backward was called twice on one graph; the gradient is computed in the forward "
            "and rescaled in place, so compute the loss again instead of retain_graph=True"
        ) from e


def _with_entropy(ctx, value: torch.Tensor, lp: torch.Tensor, ent: Optional[torch.Tensor]) -> tuple:
    """A Function's outputs: (value, lp), or (value, lp, entropy) with the entropy marked non-differentiable."""
    if ent is None:
        return value, lp
    ctx.mark_non_differentiable(ent)
    return value, lp, ent


def _weighted_value(dlp: torch.Tensor, lp: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ_n dlp[n]·lp[n], summed per sequence row first (a fixed order: deterministic)."""
    return (dlp * lp).view(rows, -1).sum(dim=1).sum()


# ---------------------------------------------------------------------------------- logits form


class TokenFunction(torch.autograd.Function):
    """(value, lp) from logits [B, T, V]; see the module docstring for the two modes."""

    @staticmethod
    def forward(ctx, x, labels, dlp, opts, inplace, needs_grad, want_entropy=False):
        B = x.shape[0]
        ctx.opts, ctx.forward_mode = opts, dlp is not None
        xd = x.detach()
        ent = torch.empty(labels.shape[0], dtype=torch.float32, device=x.device) if want_entropy else None
        if dlp is not None:
            grad = None
            if needs_grad:
                grad = xd if inplace else grad_buffer_like(xd)  # already-touched pages (_grad_buffers.py)
            lp, _ = token_kernel(opts.backend)(xd, labels, kernel_coef(dlp), grad, None, **opts.token_args(),
                                               entropy=ent)
            if grad is not None:
                if inplace and not torch.compiler.is_compiling():
                    # The kernels write through raw pointers: tell autograd that x changed, so a node
                    # that saved it (e.g. tanh's output) raises instead of using the gradient as logits.
                    torch.autograd.graph.increment_version(x)
                ctx.save_for_backward(grad)
            value = _weighted_value(dlp, lp, B)
            ctx.mark_non_differentiable(lp)
            return _with_entropy(ctx, value, lp, ent)
        lp, lse = token_kernel(opts.backend)(xd, labels, None, None, None, **opts.token_args(), entropy=ent)
        if needs_grad:
            ctx.save_for_backward(x, labels, lse)
        value = lp.new_zeros(())
        ctx.mark_non_differentiable(value)
        return _with_entropy(ctx, value, lp, ent)

    @staticmethod
    def backward(ctx, grad_value, grad_lp, *_grad_entropy):
        if ctx.forward_mode:
            (grad,) = _saved_once(ctx, "token op (forward-mode gradient)")
            return scale_grad_(grad, grad_value, ctx.opts.backend), None, None, None, None, None, None
        x, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(x)
        coef = kernel_coef(grad_lp.reshape(-1).to(torch.float32).contiguous())
        token_kernel(ctx.opts.backend)(x.detach(), labels, coef, grad, lse, **ctx.opts.token_args())
        return grad, None, None, None, None, None, None


def token_forward(
    x: torch.Tensor,
    labels: torch.Tensor,
    dlp: Optional[torch.Tensor],
    opts: TokenOptions,
    *,
    inplace: bool = False,
    entropy: bool = False,
):
    """(value, lp [B·T]) of the logits form, or (value, lp, entropy [B·T]) with ``entropy=True``; labels, dlp
    (d value / d lp): [B·T] contiguous (see the module docstring); opts: the call's
    :class:`~varkernels.core.token.TokenOptions`."""
    require_cpu_op(opts.backend)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return TokenFunction.apply(x, labels, dlp, opts, inplace, needs_grad, entropy)


# ---------------------------------------------------------------------------------- fused-linear form


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu")


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the fused-linear form runs its GEMMs in, decided at the call: under ``torch.autocast`` for
    hidden's device, the autocast dtype (as the model's own ``lm_head`` matmul would run); otherwise the promoted
    dtype of hidden and weight (bf16 hidden with an fp32 weight: fp32). The logits chunks and the token op's
    input have this dtype; accumulation stays fp32 and each gradient comes back in its tensor's own dtype."""
    dev = hidden.device.type
    if dev in _AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _autocast_off(device_type: str):
    """Autocast disabled for the driver's own GEMMs: their operands are already in ``head_dtype``, so the forward
    and the backward recompute the same products whatever autocast state each runs under."""
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dtype)


class LinearTokenFunction(torch.autograd.Function):
    """(value, lp) from hidden [B, T, H], weight [V, H], bias [V] | None; same two modes.

    The driver (core/linear.py) is called as its registered operator, the options record flattened by keyword.
    Forward mode keeps grad_weight / grad_bias in their accumulators (fp32 unless ``opts.accum_fp32`` is
    False) until backward, so the upstream scale is applied before the rounding to the parameter dtype; with
    the C++ backend and a half-precision head, the weight gradient may instead be deferred to the backward
    (core/linear_cpu.py: no fp32 [V, H] accumulator).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, dlp, opts, wants, gemm_dtype, want_entropy=False):
        B = hidden.shape[0]
        ent = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device) if want_entropy else None
        ctx.opts, ctx.forward_mode, ctx.wants, ctx.gemm_dtype = opts, dlp is not None, wants, gemm_dtype
        ctx.device_type = hidden.device.type
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        hd, wd, bd = _cast(hidden, gemm_dtype), _cast(weight, gemm_dtype), _cast(bias, gemm_dtype)
        want_h, want_w, want_b = wants
        if dlp is not None:
            coef = kernel_coef(dlp) if any(wants) else None
            deferred = None
            # (the deferred weight gradient is stored in the GEMM dtype: only when that is the weight's own)
            if coef is not None and weight.dtype == gemm_dtype and linear_cpu.forward_pass_applies(hd, wd, wants, opts):
                with _autocast_off(hd.device.type):
                    deferred = linear_cpu.forward_pass(hd, wd, bd, labels, coef, wants, opts, ent)
            ctx.deferred = deferred is not None
            if deferred is not None:
                lp, _, gh, gb, kept = deferred
                ctx.save_for_backward(gh, gb, *kept)
            else:
                with _autocast_off(hd.device.type):
                    lp, _, gh, gw, gb = torch.ops.varkernels.linear_token_pass(
                        hd, wd, bd, labels, coef, None, want_hidden=want_h, want_weight=want_w, want_bias=want_b,
                        **opts._asdict(), entropy=ent)
                if any(wants):
                    ctx.save_for_backward(gh, gw, gb)
            value = _weighted_value(dlp, lp, B)
            ctx.mark_non_differentiable(lp)
            return _with_entropy(ctx, value, lp, ent)
        with _autocast_off(hd.device.type):
            lp, lse, *_ = torch.ops.varkernels.linear_token_pass(
                hd, wd, bd, labels, None, None, want_hidden=False, want_weight=False, want_bias=False,
                **opts._asdict(), entropy=ent)
        if any(wants):
            ctx.save_for_backward(hidden, weight, bias, labels, lse)
        value = lp.new_zeros(())
        ctx.mark_non_differentiable(value)
        return _with_entropy(ctx, value, lp, ent)

    @staticmethod
    def backward(ctx, grad_value, grad_lp, *_grad_entropy):
        with _autocast_off(ctx.device_type):  # the forward's products, whatever autocast state this runs in
            return LinearTokenFunction._backward(ctx, grad_value, grad_lp)

    @staticmethod
    def _backward(ctx, grad_value, grad_lp):
        wants = ctx.wants
        if ctx.forward_mode:
            grads = _saved_once(ctx, "fused-linear token op (forward-mode gradient)")
            finished = None
            if ctx.deferred:  # grad_weight is finished here, with the upstream scale known, over its storage
                gh, gb, *kept = grads
                finished = linear_cpu.finish_weight_grad(linear_cpu.DeferredWeightGrad(*kept), grad_value)
                torch.autograd.graph.increment_version(finished)  # (written in place: one backward per graph)
                grads = (gh, finished, gb)
            out = [
                g if g is finished
                else scale_grad_(g, grad_value, ctx.opts.backend).to(dt) if want and g.numel() else None
                for g, dt, want in zip(grads, ctx.dtypes, wants)
            ]
            return (*out, None, None, None, None, None, None)
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        coef = kernel_coef(grad_lp.reshape(-1).to(torch.float32).contiguous())
        want_h, want_w, want_b = wants
        gemm = ctx.gemm_dtype  # the forward's operands again
        _, _, gh, gw, gb = torch.ops.varkernels.linear_token_pass(
            _cast(hidden, gemm), _cast(weight, gemm), _cast(bias, gemm), labels, coef, lse,
            want_hidden=want_h, want_weight=want_w, want_bias=want_b, **ctx.opts._asdict())
        out = [g.to(dt) if want and g.numel() else None for g, dt, want in zip((gh, gw, gb), ctx.dtypes, wants)]
        return (*out, None, None, None, None, None, None)


def linear_token_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    dlp: Optional[torch.Tensor],
    opts: TokenOptions,
    *,
    entropy: bool = False,
):
    """(value, lp [B·T]) of the fused-linear form, or (value, lp, entropy [B·T]) with ``entropy=True`` (see the
    module docstring); ``opts.chunk_size`` rows per chunk, ``opts.accum_fp32``: the weight/bias gradients
    accumulate in fp32 or in the GEMM dtype (:func:`head_dtype`: the autocast dtype under autocast)."""
    require_cpu_op(opts.backend)
    grad_on = torch.is_grad_enabled()
    wants = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return LinearTokenFunction.apply(hidden, weight, bias, labels, dlp, opts, wants, head_dtype(hidden, weight),
                                     entropy)
