"""VAR weights from rewards and reference log-probs, for k groups of B rows.

    var_weights(rewards, ref_logps, groups=k, group_size=B, cross_pairs, beta, weighting, backend)
        -> (weights [k·B] fp32, log_z [k·B] fp32)

rewards / ref_logps: [k, B, B] (cross-pair, R[g, i, j] = r(x_gi, y_gj)) or [k, B] (shared
context: every row of a group's matrix is the vector); k = 1 may come without its leading dim.
Each group is normalised inside itself:

    A[g, i, j] = R[g, i, j]/β + Q[g, i, j];   log Ẑ[g, i] = logsumexp_j A[g, i, j] − log B
    posterior:  log w = A[g, i, i] − log Ẑ[g, i]      (w = B·softmax(A[g, i])[i] ∈ (0, B])
    importance: log w = R[g, i, i]/β − log Ẑ[g, i]    (unbounded)

Triton: the operator ``varkernels::var_weights_triton`` (one program per row, no B×B temporaries,
no host sync). Elsewhere: the same maths in a few PyTorch ops on the tiny matrices.
"""

from __future__ import annotations

import math

import torch
from torch.library import triton_op

from .._env import load_triton_ops, on_triton_ops
from .._validation import data_checks_enabled, importance_overflow_message


def _as_group_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(group, row, column) strides reading [k, B, B] as is and [k, B] as k matrices of identical rows."""
    return (t.stride(0), t.stride(1), t.stride(2)) if t.dim() == 3 else (t.stride(0), 0, t.stride(1))


def var_weights_triton_launch(
    rewards: torch.Tensor, ref_logps: torch.Tensor, beta: float, posterior: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards, ref_logps: [k, B, B] or [k, B]. Returns (w [k·B], log_z [k·B]) fp32."""
    import triton

    from ._weights_kernel import MAX_WEIGHTS_BLOCK, _var_weights_kernel

    k, B = rewards.shape[0], rewards.shape[1]
    if B > MAX_WEIGHTS_BLOCK:
        raise ValueError(f"rewards: B must be <= {MAX_WEIGHTS_BLOCK} for the Triton weight kernel, got {B}")
    w = torch.empty(k * B, dtype=torch.float32, device=rewards.device)
    log_z = torch.empty(k * B, dtype=torch.float32, device=rewards.device)
    srg, srr, src = _as_group_strides(rewards)
    sqg, sqr, sqc = _as_group_strides(ref_logps)
    torch.library.wrap_triton(_var_weights_kernel)[(k * B,)](
        r_ptr=rewards, q_ptr=ref_logps, w_ptr=w, log_z_ptr=log_z, B=B,
        stride_rg=srg, stride_rr=srr, stride_rc=src, stride_qg=sqg, stride_qr=sqr, stride_qc=sqc,
        inv_beta=1.0 / beta, log_b=math.log(B),
        BLOCK_B=triton.next_power_of_2(B), IS_POSTERIOR=posterior, R_IS_F64=rewards.dtype == torch.float64,
        num_warps=4,
    )
    return w, log_z


def _fake_var_weights(rewards, ref_logps, beta, posterior):
    n = rewards.shape[0] * rewards.shape[1]
    return rewards.new_empty(n, dtype=torch.float32), rewards.new_empty(n, dtype=torch.float32)


def _register_var_weights_triton() -> None:
    op = triton_op("varkernels::var_weights_triton", mutates_args={})(var_weights_triton_launch)  # imports triton
    op.register_fake(_fake_var_weights)


on_triton_ops(_register_var_weights_triton)  # registered on first use (varkernels._env.load_triton_ops)


def var_weights_torch(rewards: torch.Tensor, ref_logps: torch.Tensor, beta: float, posterior: bool):
    """The same maths in PyTorch, in fp32. rewards, ref_logps: [k, B, B] or [k, B].

    A row whose R/β overflows float32 (or whose float64 rewards do not fit float32) is computed shifted by
    c = max_j R[i, j] over its possible pairs (Q > −inf), A' = (R − c)/β + Q ≤ Q (the subtraction in
    float64 for float64 rewards): the weights are a softmax, unchanged by the shift, and log Ẑ = lse(A') +
    c/β − log B (±inf when beyond float32). Every other row is computed as written, bit for bit as before;
    no host sync either way (the rows are chosen with ``torch.where``).
    """
    R, Q = rewards.detach(), ref_logps.detach().float()
    R = R if R.dtype == torch.float64 else R.float()  # float64 rewards are shifted before their fp32 cast
    B = R.shape[1]
    if R.dim() == 2:
        R, Q = R.unsqueeze(1).expand(-1, B, B), Q.unsqueeze(1).expand(-1, B, B)
    S = R.float() / beta  # R/β; ±inf where it overflows (or R does not fit fp32)
    A = S + Q
    possible = Q != -math.inf
    # a row is shifted when R/β overflowed where it counts (A = R/β − inf = −inf is fine as it is)
    shift = (A.isnan() | (S.isinf() & possible)).any(dim=-1, keepdim=True)
    c = torch.where(possible, R, -math.inf).amax(dim=-1, keepdim=True)
    S = torch.where(shift, (R - torch.where(shift, c, 0)).float() / beta, S)
    A = torch.where(shift, torch.where(possible, S + Q, -math.inf), A)
    log_z = torch.logsumexp(A, dim=-1) - math.log(B)  # of the shifted rows' A'
    num = A.diagonal(dim1=-2, dim2=-1) if posterior else S.diagonal(dim1=-2, dim2=-1)
    w = torch.exp(num - log_z)
    shift = shift.squeeze(-1)
    log_z = torch.where(shift, log_z + (c.squeeze(-1).double() / beta).float(), log_z)
    return w.reshape(-1), log_z.reshape(-1)


def var_weights(rewards, ref_logps, *, groups: int, group_size: int, cross_pairs: bool, beta: float,
                weighting: str, backend: str):
    """(weights [k·B], log_z [k·B]) fp32; see the module docstring."""
    shape = (groups, group_size, group_size) if cross_pairs else (groups, group_size)
    R, Q = rewards.detach().reshape(shape), ref_logps.detach().reshape(shape)
    posterior = weighting == "posterior"
    if backend == "triton":
        load_triton_ops()
        w, log_z = torch.ops.varkernels.var_weights_triton(R, Q, float(beta), posterior)
    else:
        w, log_z = var_weights_torch(R, Q, float(beta), posterior)
    # Posterior weights lie in (0, B] by construction. Importance weights are unbounded; the check
    # costs one host sync, paid only by the weighting that can overflow, in eager mode.
    if not posterior and data_checks_enabled(w) and not bool(torch.isfinite(w).all()):
        raise FloatingPointError(importance_overflow_message(weighting))
    return w, log_z


def group_ess(weights: torch.Tensor, groups: int) -> torch.Tensor:
    """Effective sample size (Σw)² / Σw² of each group's weights, averaged over the k groups (a group
    whose weights are all 0 — online VAR's group without a scorable completion — counts as 0)."""
    w = weights.view(groups, -1)
    s2 = (w * w).sum(dim=1)
    return torch.where(s2 > 0, w.sum(dim=1) ** 2 / s2.clamp_min(1e-30), torch.zeros_like(s2)).mean()
