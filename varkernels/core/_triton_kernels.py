"""Triton kernels of varkernels (docs/design.md §3). Importing this module imports triton.

The core's kernels know nothing of VAR (its weight kernel lives in varkernels/var/weights.py):

* ``_token_kernel`` — one program per token row n of the logits ([B, T, V] with any strides):

      z      = transform(x[n, :])                # softcap c·tanh(x/c), then /τ   (fp32)
      lse[n] = logsumexp(z)                      # sweep 1: online max / sum, exp2 with log2(e)
      lp[n]  = z[y] − lse[n]
      g[n,:] = coef[n] · (softmax(z) − onehot(y)) · dz/dx      # sweep 2, only when HAS_GRAD
      H[n]   = −Σ_v p_v·log p_v = log s − Σ_v e^(z_v − m)·(z_v − m) / s      # sweep 1, only when HAS_ENTROPY

  The entropy is one more accumulator of sweep 1, a = Σ e^(z − m)·(z − m) (shifted by the running
  max like s, so that no value of the size of the logits is subtracted), rescaled with s when the max
  moves: a ← e^(m − m')·(a + (m − m')·s). HAS_ENTROPY is a constexpr: the default specialisations
  are unchanged. It is not computed with HAS_LSE_IN (the backward's recompute).

  In PyTorch: ``lp = z.log_softmax(-1).gather(-1, y)``; ``g = coef * -d lp / dx``.
  With HAS_LSE_IN the saved logsumexp is loaded and sweep 1 skipped: this is the backward of
  the generic log-prob mode (coef = −grad_lp). Ignored rows (y == ignore_index) return early
  with lp = 0 and a zero gradient row. Loads and stores per row: one read of x for sweep 1, one
  read of x and one write of g for sweep 2 — the traffic floor of a two-sweep kernel.
  The HAS_* switches are passed by the launcher (varkernels/core/token.py), not derived with
  ``triton.heuristics``: ``torch.library.wrap_triton`` accepts only plain ``triton.jit`` kernels.

* ``_token_kernel_single`` — the same op and arguments for rows that fit on chip (V ≤ 32768):
  the row is held in registers, read once, its gradient written once. ``token_kernel_config(V,
  dtype, softcap=...)`` picks the kernel, BLOCK_V and num_warps for a launch.

* ``_scale_kernel`` — g *= s in place, skipped without a host sync when s == 1.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._validation import check_positive_int

FLT_LOWEST: tl.constexpr = tl.constexpr(-3.4028234663852886e38)  # lowest finite fp32: 0·FLT_LOWEST is 0
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
def _transform(b_x, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """The logit transform of the Triton kernels, fp32: (z, t) with z = (c·tanh(x/c))·(1/τ) and t = tanh(x/c),
    kept for dz/dx (:func:`_dz`); without a softcap z = x·(1/τ) and t = x (unused)."""
    if HAS_SOFTCAP:
        b_t = _tanh(b_x / softcap)
        return softcap * b_t * inv_temperature, b_t
    else:
        return b_x * inv_temperature, b_x


@triton.jit
def _dz(b_t, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """dz/dx of :func:`_transform` from its t: (1 − t²)/τ with a softcap, else 1/τ."""
    if HAS_SOFTCAP:
        return (1.0 - b_t * b_t) * inv_temperature
    else:
        return inv_temperature


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
def _token_kernel(
    x_ptr, grad_ptr, labels_ptr, coef_ptr, lse_in_ptr,  # inputs (grad_ptr may alias x_ptr)
    lp_ptr, lse_ptr,  # outputs: [N] fp32 each
    T, V,  # shapes: N = B·T rows of V logits
    stride_xb, stride_xt, stride_xv,  # strides of x [B, T, V]
    stride_gb, stride_gt, stride_gv,  # strides of grad [B, T, V]
    softcap, inv_temperature, ignore_index,  # scalars
    BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_LSE_IN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ent_ptr=None, HAS_ENTROPY: tl.constexpr = False,  # optional output: [N] fp32 per-row entropy
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
        if HAS_ENTROPY:
            tl.store(ent_ptr + i_n, 0.0)
        if HAS_GRAD:
            p_g = grad_ptr + i_b * stride_gb + i_t * stride_gt
            for v0 in range(0, V, BLOCK_V):
                o = v0 + o_v
                tl.store(p_g + o * stride_gv, tl.zeros([BLOCK_V], dtype=tl.float32), mask=o < V)
        return

    # target logit, transformed like every other logit
    b_zy, b_ty = _transform(tl.load(p_x + y * stride_xv).to(tl.float32), softcap, inv_temperature, HAS_SOFTCAP)

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
        if HAS_ENTROPY:
            b_a = 0.0  # Σ e^(z − m)·(z − m), shifted like s
        for v0 in range(0, V, BLOCK_V):
            o = v0 + o_v
            m_v = o < V
            b_z, b_t1 = _transform(tl.load(p_x + o * stride_xv, mask=m_v, other=float("-inf")).to(tl.float32),
                                   softcap, inv_temperature, HAS_SOFTCAP)
            if HAS_SOFTCAP:
                b_z = tl.where(m_v, b_z, float("-inf"))  # softcap maps the padding −inf to −c/τ: mask it again
            b_m_new = tl.maximum(b_m, tl.max(b_z, axis=0))
            # a tile of only −inf logits (masked vocabulary) so far: shift by 0, not by −inf (−inf − −inf = NaN)
            b_shift = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
            if HAS_ENTROPY:
                b_d = b_z - b_shift
                b_e = tl.exp2(b_d * LOG2E)
                b_alpha = tl.exp2((b_m - b_shift) * LOG2E)
                # a −inf logit has e = 0 and d = −inf: d is clamped to the lowest float, so its term is 0, not
                # 0·−inf; so is m − m' while no finite logit has come (m = −inf, s = a = 0: a stays 0)
                b_a = ((b_a + tl.maximum(b_m - b_shift, FLT_LOWEST) * b_s) * b_alpha
                       + tl.sum(b_e * tl.maximum(b_d, FLT_LOWEST), axis=0))
                b_s = b_s * b_alpha + tl.sum(b_e, axis=0)
            else:
                b_s = b_s * tl.exp2((b_m - b_shift) * LOG2E) + tl.sum(tl.exp2((b_z - b_shift) * LOG2E), axis=0)
            b_m = b_m_new
        b_log_s = tl.log(b_s)
        if HAS_ENTROPY:
            tl.store(ent_ptr + i_n, b_log_s - b_a / b_s)  # H = lse − Σ p·z = log s − Σ p·(z − m)
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
            b_z, b_t = _transform(tl.load(p_x + o * stride_xv, mask=m_v, other=0.0).to(tl.float32),
                                  softcap, inv_temperature, HAS_SOFTCAP)
            b_dz = _dz(b_t, inv_temperature, HAS_SOFTCAP)
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


# ----------------------------------------------------------------------------------------------
# Single-pass token kernel: the whole row on chip


# Largest row held in registers as one block (see token_kernel_config and tests/test_compile.py).
SINGLE_PASS_MAX_V = 32768  # 32 fp32 values per thread at num_warps=32: no spills on sm_80 / sm_90
SINGLE_PASS_MAX_V_TIGHT = 16384  # softcap, or 16-bit rows that are not 16-byte aligned: 16 per thread
SINGLE_PASS_VALUES_PER_THREAD = 32
SINGLE_PASS_VALUES_PER_THREAD_TIGHT = 16


def token_kernel_config(V: int, dtype, *, softcap=None):
    """(kernel, BLOCK_V, num_warps) of the token op for rows of V logits of ``dtype``.

    Rows that fit on chip take ``_token_kernel_single`` (one read of the row, one write of
    its gradient) with BLOCK_V = next_pow2(V) and num_warps such that each thread holds at most
    32 values (4 ≤ num_warps ≤ 32), i.e. V ≤ SINGLE_PASS_MAX_V = 32768. Two cases hold 16 values
    per thread, i.e. V ≤ SINGLE_PASS_MAX_V_TIGHT = 16384: a ``softcap`` (tanh's temporaries), and
    16-bit logits whose rows are not 16-byte aligned (V not a multiple of 8: scalar loads, one
    mask per value). Longer rows take the tiled two-sweep ``_token_kernel`` with BLOCK_V =
    min(next_pow2(V), MAX_FUSED_SIZE) and TOKEN_NUM_WARPS. Both kernels take the same arguments,
    so a launcher only swaps the kernel and these two launch parameters.

    Args:
        V: vocabulary size (row length); the table assumes rows V elements apart (contiguous logits).
        dtype: the logits' dtype (a torch.dtype; only its ``itemsize`` is read).
        softcap: the op's softcap, None or a float, as passed to the kernel.

    The limits are what compiles without register spills — cuobjdump's LOCAL 0 *and* STACK 0
    (ptxas puts spill slots in the stack frame: STACK > 0 with LOCAL 0 is still a spill) — for
    sm_80 and sm_90 with triton 3.9, checked by tests/test_compile.py; the entropy specialisations
    (HAS_ENTROPY: one more block reduction, of e·(z − m)) fit the same table. At num_warps=32 a thread
    has at most 64 registers: enough for a 32-value slice of the row (and the one exp value per
    logit kept for the gradient), not for 32 values of tanh's temporaries (16-104 bytes of stack)
    nor for 32 unaligned 16-bit loads' masks on sm_90 (8 bytes).
    """
    check_positive_int("token_kernel_config: V", V)
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize not in (2, 4):
        raise TypeError(f"token_kernel_config: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    block = triton.next_power_of_2(V)
    tight = softcap is not None or (itemsize == 2 and V % 8 != 0)
    if tight:
        cap, per_thread = SINGLE_PASS_MAX_V_TIGHT, SINGLE_PASS_VALUES_PER_THREAD_TIGHT
    else:
        cap, per_thread = SINGLE_PASS_MAX_V, SINGLE_PASS_VALUES_PER_THREAD
    if block <= cap:
        num_warps = min(32, max(4, block // (32 * per_thread)))
        return _token_kernel_single, block, num_warps
    return _token_kernel, min(block, MAX_FUSED_SIZE), TOKEN_NUM_WARPS


@triton.jit
def _token_kernel_single(
    x_ptr, grad_ptr, labels_ptr, coef_ptr, lse_in_ptr,  # inputs (grad_ptr may alias x_ptr)
    lp_ptr, lse_ptr,  # outputs: [N] fp32 each
    T, V,  # shapes: N = B·T rows of V logits
    stride_xb, stride_xt, stride_xv,  # strides of x [B, T, V]
    stride_gb, stride_gt, stride_gv,  # strides of grad [B, T, V]
    softcap, inv_temperature, ignore_index,  # scalars
    BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr,
    HAS_GRAD: tl.constexpr, HAS_LSE_IN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ent_ptr=None, HAS_ENTROPY: tl.constexpr = False,  # optional output: [N] fp32 per-row entropy
):
    """``_token_kernel`` for rows that fit on chip (V ≤ BLOCK_V): same arguments, same results.

    The row is loaded once as one BLOCK_V block and stays in registers: m = max z, e = 2^((z − m)·
    log2e), s = Σ e, then the gradient from the same registers, stored once. Per row: one read of
    x and (with HAS_GRAD) one write of g, the traffic floor, against one read for sweep 1 plus one
    read and one write for sweep 2 in the tiled kernel. lp and lse are computed as in the tiled
    kernel (bitwise equal when the tiled kernel has one tile, without softcap); the softmax of the gradient is e/s
    from the registers (the tiled kernel recomputes 2^(((z − m) − log s)·log2e), which rounds the
    argument; e/s does not), or that recomputation with HAS_LSE_IN and with a softcap, where only
    t = tanh(x/c) is kept per logit. The target logit is a single-element load, as in the tiled
    kernel: it is issued beside the row load and costs one element per row (a masked block
    reduction would cost a barrier). ``token_kernel_config`` gives BLOCK_V and num_warps.
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    i_n = tl.program_id(0).to(tl.int64)
    i_b = i_n // T
    i_t = i_n % T
    y = tl.load(labels_ptr + i_n).to(tl.int64)
    p_x = x_ptr + i_b * stride_xb + i_t * stride_xt
    o_v = tl.arange(0, BLOCK_V)
    m_v = o_v < V

    if y == ignore_index:
        tl.store(lp_ptr + i_n, 0.0)
        tl.store(lse_ptr + i_n, 0.0)
        if HAS_ENTROPY:
            tl.store(ent_ptr + i_n, 0.0)
        if HAS_GRAD:
            p_g = grad_ptr + i_b * stride_gb + i_t * stride_gt
            tl.store(p_g + o_v * stride_gv, tl.zeros([BLOCK_V], dtype=tl.float32), mask=m_v)
        return

    b_zy, b_ty = _transform(tl.load(p_x + y * stride_xv).to(tl.float32), softcap, inv_temperature, HAS_SOFTCAP)

    b_x = tl.load(p_x + o_v * stride_xv, mask=m_v, other=float("-inf")).to(tl.float32)
    # Register budget (see token_kernel_config): only one fp32 value per logit may stay alive across
    # the block reductions — z, then e = 2^((z − m)·log2e); with softcap, t = tanh(x/c), from
    # which z = t·(c/τ) is recomputed each time it is needed (written so that no product t·(c/τ)
    # is shared between the uses, which would keep a second value per logit alive). This factored
    # form of _transform is the one place the row's transform is written out; dz/dx is _dz's.
    if HAS_SOFTCAP:
        b_k = softcap * inv_temperature
        b_t = tl.where(m_v, _tanh(b_x / softcap), float("-inf"))  # padding → z = −inf
    else:
        b_z = b_x * inv_temperature

    if HAS_LSE_IN:
        b_m = tl.load(lse_in_ptr + i_n)  # lse = m + log s with m = lse, log s = 0
        b_log_s = 0.0
    else:
        if HAS_SOFTCAP:
            b_m = tl.max(b_t, axis=0) * b_k  # max(t)·k = max(t·k) for k > 0: rounding is monotone
        else:
            b_m = tl.max(b_z, axis=0)
        # a row of only −inf logits (masked vocabulary): shift by 0, not by −inf (−inf − −inf = NaN)
        b_shift = tl.where(b_m == float("-inf"), 0.0, b_m)
        if HAS_ENTROPY:
            # H = log s − Σ e·(z − m) / s; a −inf logit (or the padding) has e = 0 and d clamped to the lowest
            # float: its term is 0, not 0·−inf
            if HAS_SOFTCAP:
                b_d = tl.fma(b_t, b_k, -b_shift)
            else:
                b_d = b_z - b_shift
            b_e = tl.exp2(b_d * LOG2E)
            b_a = tl.sum(b_e * tl.maximum(b_d, FLT_LOWEST), axis=0)
        elif HAS_SOFTCAP:
            b_e = tl.exp2(tl.fma(b_t, b_k, -b_shift) * LOG2E)
        else:
            b_e = tl.exp2((b_z - b_shift) * LOG2E)
        b_sum = tl.sum(b_e, axis=0)
        b_log_s = tl.log(b_sum)
        if HAS_ENTROPY:
            tl.store(ent_ptr + i_n, b_log_s - b_a / b_sum)
    # lp = (z_y − m) − log s, not z_y − lse (see _token_kernel)
    tl.store(lp_ptr + i_n, (b_zy - b_m) - b_log_s)
    tl.store(lse_ptr + i_n, b_m + b_log_s)

    if HAS_GRAD:
        b_coef = tl.load(coef_ptr + i_n)
        p_g = grad_ptr + i_b * stride_gb + i_t * stride_gt
        # softmax, 0 on padding: e/s from the registers, or (z − m) − log s shifted like lp above
        if HAS_SOFTCAP:
            b_p = tl.exp2((tl.fma(b_t, b_k, -b_m) - b_log_s) * LOG2E)
        elif HAS_LSE_IN:
            b_p = tl.exp2(((b_z - b_m) - b_log_s) * LOG2E)
        else:
            b_p = b_e * (1.0 / b_sum)
        b_p = tl.where(o_v == y.to(tl.int32), b_p - 1.0, b_p)  # y < V ≤ BLOCK_V: an int32 compare per lane
        # t ≥ −1 is tanh's; the padding's −inf becomes −1, so that 0 · dz is 0, not NaN
        b_g = b_coef * b_p * _dz(tl.maximum(b_t, -1.0) if HAS_SOFTCAP else b_z, inv_temperature, HAS_SOFTCAP)
        tl.store(p_g + o_v * stride_gv, _cast_out(b_g, grad_ptr.dtype.element_ty, RNE_BF16), mask=m_v)
