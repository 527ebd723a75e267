"""The B×B weight op (SPEC §1.4-1.5) on every backend.

    var_weights(rewards [B,B] | [B], ref_logps (same shape), beta, weighting, backend)
        -> (weights [B] fp32, log_z [B] fp32)

Triton: one program per row (``_var_weights_kernel``); no B×B temporaries, no host sync
(except the overflow check of ``weighting="importance"``, see below). CPU: the same maths
in a few PyTorch ops on the tiny B×B matrix.
"""

from __future__ import annotations

import math

import torch

from ..reference import importance_overflow_message, var_log_weights


def _as_matrix_strides(t: torch.Tensor):
    """(row stride, column stride) that read a (B,) vector as a matrix of identical rows."""
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, t.stride(0))


def weights_triton(rewards, ref_logps, beta, weighting):
    import triton

    from ..core._triton_kernels import MAX_WEIGHTS_BLOCK, _var_weights_kernel

    B = rewards.shape[0]
    if B > MAX_WEIGHTS_BLOCK:
        raise ValueError(f"rewards: B must be <= {MAX_WEIGHTS_BLOCK} for the Triton weight kernel, got {B}")
    w = torch.empty(B, dtype=torch.float32, device=rewards.device)
    log_z = torch.empty(B, dtype=torch.float32, device=rewards.device)
    srr, src = _as_matrix_strides(rewards)
    sqr, sqc = _as_matrix_strides(ref_logps)
    _var_weights_kernel[(B,)](
        r_ptr=rewards, q_ptr=ref_logps, w_ptr=w, log_z_ptr=log_z, B=B,
        stride_rr=srr, stride_rc=src, stride_qr=sqr, stride_qc=sqc,
        inv_beta=1.0 / beta, log_b=math.log(B),
        BLOCK_B=triton.next_power_of_2(B), IS_POSTERIOR=weighting == "posterior",
        num_warps=4,
    )
    return w, log_z


def weights_torch(rewards, ref_logps, beta, weighting):
    log_w, log_z = var_log_weights(rewards.detach().float(), ref_logps.detach().float(), beta, weighting)
    return torch.exp(log_w), log_z


def var_weights(rewards, ref_logps, *, beta: float, weighting: str, backend: str):
    if backend == "triton":
        w, log_z = weights_triton(rewards, ref_logps, beta, weighting)
    else:
        w, log_z = weights_torch(rewards, ref_logps, beta, weighting)
    # Posterior weights lie in (0, B] by construction. Importance weights are unbounded; the check
    # costs one host sync, paid only by the weighting that can overflow.
    if weighting == "importance" and not bool(torch.isfinite(w).all()):
        raise FloatingPointError(importance_overflow_message(weighting))
    return w, log_z
