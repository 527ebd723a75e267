"""Triton kernels of varkernels (docs/design.md §3). Importing this module imports triton.

The core's kernels know nothing of VAR (its weight kernel lives in varkernels/var/weights.py):

* ``_var_token_kernel`` — one program per token row n of the logits ([B, T, V] with any strides):

      z      = transform(x[n, :])                # softcap c·tanh(x/c), then /τ   (fp32)
      lse[n] = logsumexp(z)                      # sweep 1: online max / sum, exp2 with log2(e)
      lp[n]  = z[y] − lse[n]
      g[n,:] = coef[n] · (softmax(z) − onehot(y)) · dz/dx      # sweep 2, only when HAS_GRAD

  In PyTorch: ``lp = z.log_softmax(-1).gather(-1, y)``; ``g = coef * -d lp / dx``.
  With HAS_LSE_IN the saved logsumexp is loaded and sweep 1 skipped: this is the backward of
  the generic log-prob mode (coef = −grad_lp). Ignored rows (y == ignore_index) return early
  with lp = 0 and a zero gradient row. Loads and stores per row: one read of x for sweep 1, one
  read of x and one write of g for sweep 2 — the traffic floor of a two-sweep kernel.
  The HAS_* switches are passed by the launcher (varkernels/core/token.py), not derived with
  ``triton.heuristics``: ``torch.library.wrap_triton`` accepts only plain ``triton.jit`` kernels.

* ``_scale_kernel`` — g *= s in place, skipped without a host sync when s == 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_FUSED_SIZE = 4096  # BLOCK_V cap: 16 fp32 values per thread at num_warps=8, no spills (see tests/test_compile.py)
TOKEN_NUM_WARPS = 8


@triton.jit
def _tanh(u):
    # tanh(u) = sign(u)·(1 − e^{−2|u|}) / (1 + e^{−2|u|}): no overflow for large |u|. For |u| < 0.1
    # the subtraction 1 − e loses up to ~5 ulp, so use the odd Taylor series there (truncation
    # error 62/2835·u^9 < 3e-10 relative). Written out because the interpreter lacks libdevice.tanh.
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    t_small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.1, t_small, t)
    return tl.where(u < 0, -t, t)


@triton.jit
def _cast_out(b_x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 → ``dtype`` for a store. GPUs round fp32 → bf16 to nearest even; the Triton
    interpreter (3.9) truncates. With RNE_BF16 (set by the launchers only under the interpreter)
    the rounding is done by hand so that parity tests see the values a GPU writes."""
    if RNE_BF16:
        b_bits = b_x.to(tl.uint32, bitcast=True)
        b_bits = b_bits + 0x7FFF + ((b_bits >> 16) & 1)
        return (b_bits & 0xFFFF0000).to(tl.float32, bitcast=True).to(dtype)
    else:
        return b_x.to(dtype)


@triton.jit
def _var_token_kernel(
    x_ptr, grad_ptr, labels_ptr, coef_ptr, lse_in_ptr,  # inputs (grad_ptr may alias x_ptr)
    lp_ptr, lse_ptr,  # outputs: [N] fp32 each
    T, V,  # shapes: N = B·T rows of V logits
    stride_xb, stride_xt, stride_xv,  # strides of x [B, T, V]
    stride_gb, stride_gt, stride_gv,  # strides of grad [B, T, V]
    softcap, inv_temperature, ignore_index,  # scalars
    BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_LSE_IN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    y = tl.load(labels_ptr + i_n).to(tl.int64)
    p_x = x_ptr + i_b * stride_xb + i_t * stride_xt
    o_v = tl.arange(0, BLOCK_V)

    if y == ignore_index:
        tl.store(lp_ptr + i_n, 0.0)
        tl.store(lse_ptr + i_n, 0.0)
        if HAS_GRAD:
            p_g = grad_ptr + i_b * stride_gb + i_t * stride_gt
            for v0 in range(0, V, BLOCK_V):
                o = v0 + o_v
                tl.store(p_g + o * stride_gv, tl.zeros([BLOCK_V], dtype=tl.float32), mask=o < V)
        return

    # target logit, transformed like every other logit
    b_xy = tl.load(p_x + y * stride_xv).to(tl.float32)
    if HAS_SOFTCAP:
        b_xy = softcap * _tanh(b_xy / softcap)
    b_zy = b_xy * inv_temperature

    if HAS_LSE_IN:
        b_m = tl.load(lse_in_ptr + i_n)  # lse = m + log s with m = lse, log s = 0
        b_log_s = 0.0
    else:
        # sweep 1: online logsumexp (running max m of z, running sum s of e^(z − m) = 2^((z − m)·log2e)).
        # The max stays in natural units and log2e scales the small difference z − m: scaling z
        # itself first (z·log2e − m·log2e) rounds at the magnitude of z, ~1e-6 absolute for |z| ≈ 20,
        # which made p = softmax(z)[y] near 1 (and its gradient p − 1) ~10× less accurate than PyTorch.
        b_m = float("-inf")
        b_s = 0.0
        for v0 in range(0, V, BLOCK_V):
            o = v0 + o_v
            m_v = o < V
            b_x = tl.load(p_x + o * stride_xv, mask=m_v, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                # softcap maps the padding −inf to −c: mask again so padding adds nothing
                b_x = tl.where(m_v, softcap * _tanh(b_x / softcap), float("-inf"))
            b_z = b_x * inv_temperature
            b_m_new = tl.maximum(b_m, tl.max(b_z, axis=0))
            # a tile of only −inf logits (masked vocabulary) so far: shift by 0, not by −inf (−inf − −inf = NaN)
            b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            b_s = b_s * tl.exp2((b_m - b_shift) * LOG2E) + tl.sum(tl.exp2((b_z - b_shift) * LOG2E), axis=0)
            b_m = b_m_new
        b_log_s = tl.log(b_s)
    # lp = (z_y − m) − log s, not z_y − lse: lse is rounded at the magnitude of m (~1e-6 for |m| ≈ 20)
    # while a confident token has lp ≈ 0; PyTorch's log_softmax subtracts in this order too.
    tl.store(lp_ptr + i_n, (b_zy - b_m) - b_log_s)
    tl.store(lse_ptr + i_n, b_m + b_log_s)

    if HAS_GRAD:
        # sweep 2: g = coef · (softmax − onehot) · dz/dx, all in fp32, cast on store
        b_coef = tl.load(coef_ptr + i_n)
        p_g = grad_ptr + i_b * stride_gb + i_t * stride_gt
        for v0 in range(0, V, BLOCK_V):
            o = v0 + o_v
            m_v = o < V
            b_x = tl.load(p_x + o * stride_xv, mask=m_v, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                b_t = _tanh(b_x / softcap)
                b_dz = (1.0 - b_t * b_t) * inv_temperature
                b_z = softcap * b_t * inv_temperature
            else:
                b_dz = inv_temperature
                b_z = b_x * inv_temperature
            b_p = tl.exp2(((b_z - b_m) - b_log_s) * LOG2E)  # softmax, shifted like lp above
            b_p = tl.where(o == y, b_p - 1.0, b_p)
            b_g = b_coef * b_p * b_dz
            tl.store(p_g + o * stride_gv, _cast_out(b_g, grad_ptr.dtype.element_ty, RNE_BF16), mask=m_v)


@triton.jit
def _scale_kernel(g_ptr, s_ptr, N, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    """g *= s[0] in place, a no-op (no loads or stores of g) when s[0] == 1: no host sync."""
    b_s = tl.load(s_ptr).to(tl.float32)
    if b_s == 1.0:
        return
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_g = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    tl.store(g_ptr + o, _cast_out(b_g * b_s, g_ptr.dtype.element_ty, RNE_BF16), mask=m)
