"""The token op on every backend: per-row logsumexp, target log-prob and, optionally, the
gradient coef·(softmax − onehot)·dz/dx written into a [B, T, V] buffer (which may be the
logits themselves). See ``_triton_kernels._var_token_kernel`` for the maths.

    token_op(x [B,T,V], labels [B·T], coef [B·T] | None, grad [B,T,V] | None,
             lse_in [B·T] | None, ...) -> (lp [B·T] fp32, lse [B·T] fp32)

Backends: ``token_triton`` (Triton kernel), ``token_torch`` (chunked PyTorch: never more than
a chunk of fp32 rows alive, ``CHUNK_BYTES`` per buffer), ``token_cpu`` (C++ kernel of csrc/).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import resolve_backend
from .._common import (
    check_pair_inputs,
    check_policy_inputs,
    check_positive,
    check_same_device,
    check_values,
    shifted_labels,
)

CHUNK_BYTES = 16 * 2**20  # fp32 bytes per chunk buffer of the PyTorch path; ~3 such buffers are alive


def rne_bf16(out) -> bool:
    """True when a Triton kernel must round fp32 → bf16 by hand: only in the interpreter,
    which truncates where GPUs round to nearest even (see ``_triton_kernels._cast_out``)."""
    from .._backend import triton_interpret

    return out is not None and out.dtype == torch.bfloat16 and out.device.type != "cuda" and triton_interpret()


def token_triton(x, labels, coef, grad, lse_in, *, softcap, temperature, ignore_index):
    import triton

    from ..core._triton_kernels import MAX_FUSED_SIZE, TOKEN_NUM_WARPS, _var_token_kernel

    B, T, V = x.shape
    N = B * T
    lp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    gs = grad.stride() if grad is not None else (0, 0, 0)
    _var_token_kernel[(N,)](
        x_ptr=x, grad_ptr=grad, labels_ptr=labels, coef_ptr=coef, lse_in_ptr=lse_in,
        lp_ptr=lp, lse_ptr=lse,
        T=T, V=V,
        stride_xb=x.stride(0), stride_xt=x.stride(1), stride_xv=x.stride(2),
        stride_gb=gs[0], stride_gt=gs[1], stride_gv=gs[2],
        softcap=softcap, inv_temperature=1.0 / temperature, ignore_index=ignore_index,
        BLOCK_V=min(triton.next_power_of_2(V), MAX_FUSED_SIZE),
        RNE_BF16=rne_bf16(grad),
        num_warps=TOKEN_NUM_WARPS,
    )
    return lp, lse


def _transform(x: torch.Tensor, softcap: Optional[float], temperature: float):
    """fp32 z = transform(x) and dz/dx (a tensor, or a Python float when constant)."""
    z = x.float()
    dz = 1.0 / temperature
    if softcap is not None:
        t = torch.tanh(z / softcap)
        dz = (1.0 - t * t).mul_(1.0 / temperature)
        z = t.mul_(softcap)
    if temperature != 1.0:
        z = z / temperature if z is x else z.div_(temperature)  # never write into the caller's x
    return z, dz


def token_torch(x, labels, coef, grad, lse_in, *, softcap, temperature, ignore_index, chunk_bytes=CHUNK_BYTES):
    B, T, V = x.shape
    N = B * T
    lp = torch.zeros(N, dtype=torch.float32, device=x.device)
    lse = torch.zeros(N, dtype=torch.float32, device=x.device)
    rows = max(1, chunk_bytes // (4 * V))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            n0, n1 = b * T + t0, b * T + t1
            y = labels[n0:n1].long()
            valid = y != ignore_index
            if not bool(valid.any()):
                if grad is not None:
                    grad[b, t0:t1].zero_()
                continue
            ys = torch.where(valid, y, 0).unsqueeze(1)
            x_c = x[b, t0:t1]
            z, dz = _transform(x_c, softcap, temperature)
            # Shift by the row max m first, then lp = (z_y − m) − log s and p = exp((z − m) − log s):
            # z_y − lse would carry the rounding of lse (~1e-6 for |z| ≈ 20) into a confident token's lp ≈ 0.
            if lse_in is None:
                m = z.amax(dim=1, keepdim=True)
                m = torch.where(torch.isinf(m), 0.0, m)  # an all −inf row: shift by 0, not −inf
                zm = torch.sub(z, m)  # fresh buffer (z may be the caller's x)
                log_s = torch.logsumexp(zm, dim=1, keepdim=True)
                c_lse = (m + log_s).squeeze(1)
            else:
                log_s = lse_in[n0:n1].unsqueeze(1)  # m = 0: z − m is z, copied only when it is the caller's x
                zm = z.clone() if z is x_c else z
                c_lse = lse_in[n0:n1]
            c_lp = zm.gather(1, ys).squeeze(1) - log_s.squeeze(1)
            lp[n0:n1] = torch.where(valid, c_lp, 0.0)
            lse[n0:n1] = torch.where(valid, c_lse, 0.0)
            if grad is None:
                continue
            p = zm.sub_(log_s).exp_()  # softmax, in zm's buffer
            p.scatter_add_(1, ys, torch.full_like(c_lse, -1.0).unsqueeze(1))
            p.mul_(torch.where(valid, coef[n0:n1], 0.0).unsqueeze(1))
            if not isinstance(dz, float) or dz != 1.0:
                p.mul_(dz)
            p.masked_fill_(~valid.unsqueeze(1), 0.0)
            grad[b, t0:t1].copy_(p)
    return lp, lse


def token_cpu(x, labels, coef, grad, lse_in, *, softcap, temperature, ignore_index):
    from ..csrc_loader import load_extension

    ext = load_extension(required=True)
    return ext.token_op(x, labels, coef, grad, lse_in, softcap, 1.0 / temperature, ignore_index)


_TOKEN_OPS = {"triton": token_triton, "torch": token_torch, "cpu": token_cpu}


def token_op(
    backend: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    coef: Optional[torch.Tensor] = None,
    grad: Optional[torch.Tensor] = None,
    lse_in: Optional[torch.Tensor] = None,
    *,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """Dispatch the token op. x: [B, T, V]; labels: [B·T] contiguous; coef/lse_in: [B·T] fp32."""
    return _TOKEN_OPS[backend](
        x, labels, coef, grad, lse_in, softcap=softcap, temperature=temperature, ignore_index=ignore_index
    )


def prepare_token_call(
    name, x, labels, vocab_size, *, ignore_index, shift_labels, softcap, temperature, backend,
    rewards=None, ref_logps=None,
):
    """Validation shared by every public op (SPEC §2), run before any kernel touches memory.

    Checks the logit transforms, x ([B, T, *]) against labels, rewards/ref_logps when given,
    devices and the data-dependent values (one host sync). Returns (backend, labels_eff), where
    labels_eff carries the Hugging Face shift when ``shift_labels``.
    """
    check_positive("temperature", temperature)
    check_positive("softcap", softcap, allow_none=True)
    check_policy_inputs(name, x, labels, vocab_size)
    if rewards is not None or ref_logps is not None:
        check_pair_inputs(rewards, ref_logps, x.shape[0])
    check_same_device(**{name: x, "labels": labels, "rewards": rewards, "ref_logps": ref_logps})
    backend = resolve_backend(backend, x.device)
    check_values(labels, vocab_size, ignore_index, rewards, ref_logps)
    labels_eff = shifted_labels(labels, ignore_index) if shift_labels else labels
    return backend, labels_eff
