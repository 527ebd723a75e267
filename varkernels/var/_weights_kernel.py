"""Triton kernel of the VAR weights (imports triton).

``_var_weights_kernel`` — one program per policy row r = g·B + i (group g, row i of the group) of
the weight-logit matrix A[g, i, j] = R[g, i, j]/β + Q[g, i, j]: stable row logsumexp,
log Ẑ = lse − log B and log w (posterior: A[g, i, i] − log Ẑ; importance: R[g, i, i]/β − log Ẑ),
w = exp(log w). The shared-context [k, B] form is the same kernel with a row stride of 0.
A row whose R/β overflows float32 (or whose float64 rewards do not fit it: they are loaded as float64,
``R_IS_F64``) is shifted by its largest reward c over the possible pairs: A' = (R − c)/β + Q, the same
softmax, log Ẑ = lse(A') + c/β − log B. Other rows compute exactly the unshifted expressions.
In PyTorch: ``log_z = (R/β + Q).logsumexp(-1) − log B``; ``w = exp(diag − log_z)``.
"""

import triton
import triton.language as tl

MAX_WEIGHTS_BLOCK = 16384  # B above this would need a tiled row sweep; far beyond any micro-batch


@triton.jit
def _var_weights_kernel(
    r_ptr, q_ptr,  # inputs: R, Q as [k, B, B] (row stride 0 for the [k, B] form)
    w_ptr, log_z_ptr,  # outputs: [k·B] fp32 each
    B,  # shape: rows per group
    stride_rg, stride_rr, stride_rc, stride_qg, stride_qr, stride_qc,  # strides
    inv_beta, log_b,  # scalars: 1/β, log B
    BLOCK_B: tl.constexpr, IS_POSTERIOR: tl.constexpr, R_IS_F64: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    i_g = i_n // B
    i_r = i_n % B
    o_b = tl.arange(0, BLOCK_B)
    m_b = o_b < B
    p_r = r_ptr + i_g * stride_rg + i_r * stride_rr
    p_q = q_ptr + i_g * stride_qg + i_r * stride_qr
    b_r = tl.load(p_r + o_b * stride_rc, mask=m_b, other=0.0)  # float64 rewards stay float64 until shifted
    if not R_IS_F64:
        b_r = b_r.to(tl.float32)
    b_q = tl.load(p_q + o_b * stride_qc, mask=m_b, other=float("-inf")).to(tl.float32)
    b_s = b_r.to(tl.float32) * inv_beta
    b_a = tl.where(m_b, b_s + b_q, float("-inf"))
    # R/β overflowed float32 in a possible pair (or NaN = +inf − inf): shift the row by its largest reward c
    # over the possible pairs, A' = (R − c)/β + Q (a softmax is unchanged by the shift). Other rows: c = 0
    # and exactly the values above.
    m_p = m_b & (b_q != float("-inf"))
    b_bad = (b_a != b_a) | ((b_s == float("inf")) | (b_s == float("-inf"))) & m_p
    shift = tl.max(b_bad.to(tl.int32), axis=0) > 0
    b_c = tl.max(tl.where(m_p, b_r, float("-inf")), axis=0)
    b_s = tl.where(shift, (b_r - tl.where(shift, b_c, 0.0)).to(tl.float32) * inv_beta, b_s)
    b_a = tl.where(shift, tl.where(m_p, b_s + b_q, float("-inf")), b_a)
    b_max = tl.max(b_a, axis=0)
    b_log_z = b_max + tl.log(tl.sum(tl.exp(b_a - b_max), axis=0)) - log_b
    m_diag = o_b == i_r
    if IS_POSTERIOR:
        b_num = tl.sum(tl.where(m_diag, b_a, 0.0), axis=0)
    else:
        b_num = tl.sum(tl.where(m_diag, b_s, 0.0), axis=0)
    tl.store(w_ptr + i_n, tl.exp(b_num - b_log_z))
    # log Ẑ of a shifted row: + c/β (±inf beyond float32)
    tl.store(log_z_ptr + i_n, tl.where(shift, b_log_z + (b_c * inv_beta).to(tl.float32), b_log_z))
