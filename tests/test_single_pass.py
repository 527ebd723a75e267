"""The single-pass token kernel ``_token_kernel_single`` (docs/design.md §3, §4.1) in the interpreter.

For rows that fit on chip the kernel holds the whole row in registers: one read of the logits,
one write of the gradient. It takes the arguments of the tiled ``_token_kernel``, so the
token op's launcher only swaps the kernel and (BLOCK_V, num_warps), which
``token_kernel_config(V, dtype, softcap=...)`` chooses. ``launch_token`` below mirrors
``varkernels.core.token.token_triton_launch`` with that choice (or a forced kernel); the tests run both
kernels on the same inputs and check:

* the per-token log-prob, logsumexp and gradient coef·(softmax − onehot)·dz/dx against a float64
  ground truth with the tolerance policy of ``helpers.assert_close`` (PyTorch's own error in the
  input dtype, ``varkernels.reference.token_logps_reference`` + autograd, is the yardstick), in
  fp32 / bf16 / fp16, V = 1000 and 32003 (odd: a masked tail), all-ignored rows, softcap,
  temperature, and the lse_in mode (the backward of the generic log-prob op);
* lp and lse bitwise equal to the tiled kernel's for a row of one tile (the same sums);
* in-place (gradient written over the logits), strided logits, and the configuration table.
"""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE_INDEX, assert_close, exp2_grad_atol, exp2_lp_atol, lp_atol, make_labels, make_logits

from varkernels._backend import triton_interpret
from varkernels.core import _triton_kernels as K
from varkernels.reference import token_logps_reference, transform_logits

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def launch_token(x, labels, coef, grad, lse_in, *, softcap=None, temperature=1.0, ignore_index=IGNORE_INDEX,
                 kernel="auto", entropy=None):
    """``token_triton_launch`` of varkernels/core/token.py, with the kernel choice forcible.

    kernel: "auto" (the configuration table), "single" or "tiled" (forced, with the launch
    parameters the table gives that kernel). entropy: the optional [B·T] fp32 output (HAS_ENTROPY).
    Returns (lp [B·T] fp32, lse [B·T] fp32).
    """
    import triton

    B, T, V = x.shape
    N = B * T
    auto, block, num_warps = K.token_kernel_config(V, x.dtype, softcap=softcap)
    if kernel == "single":
        fn, block = K._token_kernel_single, triton.next_power_of_2(V)
        num_warps = min(32, max(4, block // 1024))  # the interpreter ignores it
    elif kernel == "tiled":
        fn, block, num_warps = K._token_kernel, min(triton.next_power_of_2(V), K.MAX_FUSED_SIZE), K.TOKEN_NUM_WARPS
    else:
        fn = auto
    lp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    gs = grad.stride() if grad is not None else (0, 0, 0)
    rne = grad is not None and grad.dtype == torch.bfloat16 and grad.device.type != "cuda" and triton_interpret()
    fn[(N,)](
        x_ptr=x, grad_ptr=grad, labels_ptr=labels, coef_ptr=coef, lse_in_ptr=lse_in,
        lp_ptr=lp, lse_ptr=lse,
        T=T, V=V,
        stride_xb=x.stride(0), stride_xt=x.stride(1), stride_xv=x.stride(2),
        stride_gb=gs[0], stride_gt=gs[1], stride_gv=gs[2],
        softcap=softcap, inv_temperature=1.0 / temperature, ignore_index=ignore_index,
        BLOCK_V=block, RNE_BF16=rne,
        HAS_GRAD=grad is not None, HAS_LSE_IN=lse_in is not None, HAS_SOFTCAP=softcap is not None,
        ent_ptr=entropy, HAS_ENTROPY=entropy is not None,
        num_warps=num_warps,
    )
    return lp, lse


# --------------------------------------------------------------------------------------------
# ground truth


def _inputs(B, T, V, dtype, *, ignored_rows=(1,), seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = make_labels(B, T, V, ignored_rows=ignored_rows, generator=g)
    x = make_logits(B, T, V, dtype, labels=torch.where(labels == IGNORE_INDEX, 0, labels),
                    requires_grad=False, generator=g)
    coef = torch.randn(B * T, generator=g)  # any per-row coefficient: VAR's −w_i·c_i/B, or −grad_lp
    return x, labels, coef


def reference_token_op(x, labels, coef, *, softcap, temperature, float64):
    """(lp [N], lse [N], grad [B,T,V]) of the token op from varkernels.reference: the kernels'
    gradient is d(−Σ coef·lp)/dx. In float64 (truth) or in x's dtype (PyTorch's yardstick:
    fp32 compute, gradient cast back to x's dtype by autograd)."""
    xr = (x.double() if float64 else x.clone()).requires_grad_(True)
    lp, mask = token_logps_reference(xr, labels, softcap=softcap, temperature=temperature)
    c = coef.double() if float64 else coef
    (-(c.view_as(lp) * lp).sum()).backward()
    with torch.no_grad():
        z = transform_logits(xr.detach().to(lp.dtype), softcap, temperature)
        lse = torch.where(mask, torch.logsumexp(z, dim=-1), 0.0)
    return lp.detach().flatten(), lse.flatten(), xr.grad


def _check(x, labels, coef, *, softcap=None, temperature=1.0, mode="var", kernel="single", exp2_rel_err=0.0):
    """Run the kernel in one of its modes and check every output against the reference.

    mode: "var" (HAS_GRAD, the VAR forward), "logps_fwd" (no gradient), "logps_bwd" (HAS_LSE_IN:
    the saved lse of a forward run is given, the gradient recomputed from it). ``exp2_rel_err``: the
    device exp2's relative error bound (the GPU suite passes CUDA's; 0 here, in the interpreter): it
    adds the derived floors of helpers.exp2_lp_atol / exp2_grad_atol (docs/design.md §4.6) for the
    kernel's BLOCK_V tiles per row.
    """
    B, T, V = x.shape
    flat = labels.flatten()
    opts = dict(softcap=softcap, temperature=temperature)
    truth_lp, truth_lse, truth_g = reference_token_op(x, labels, coef, float64=True, **opts)
    ref_lp, ref_lse, ref_g = reference_token_op(x, labels, coef, float64=False, **opts)
    token_floor = lp_atol(torch.ones(()))  # one token's absolute fp32 noise (helpers.lp_atol, a_k = 1)
    exp2_tiles = 1 if kernel == "single" else -(-V // min(1 << (V - 1).bit_length(), K.MAX_FUSED_SIZE))
    token_floor += exp2_lp_atol(torch.ones(()), exp2_rel_err, exp2_tiles)

    lse_in = None
    if mode == "logps_bwd":
        _, lse_in = launch_token(x, flat, None, None, None, kernel=kernel, **opts)
    grad = torch.full_like(x, float("nan")) if mode != "logps_fwd" else None  # every entry must be written
    lp, lse = launch_token(x, flat, coef if grad is not None else None, grad, lse_in, kernel=kernel, **opts)
    if mode != "logps_bwd":
        assert_close(lp, ref_lp.float(), truth_lp, name="lp", atol_floor=token_floor)
        assert_close(lse, ref_lse.float(), truth_lse, name="lse", atol_floor=token_floor)
    else:  # lse is passed through
        assert torch.equal(lse, torch.where(flat != IGNORE_INDEX, lse_in, 0.0))
    if grad is not None:
        assert grad.dtype == x.dtype
        assert_close(grad, ref_g, truth_g, name=f"grad ({mode})", atol_floor=exp2_grad_atol(truth_g, exp2_rel_err,
                                                                                         exp2_tiles))
        ignored = (flat == IGNORE_INDEX).view(B, T)
        assert bool((grad[ignored] == 0).all()), "ignored rows must get a zero gradient row"
    return lp, lse, grad


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("mode", ["var", "logps_fwd", "logps_bwd"])
@pytest.mark.parametrize("V", [1000, 32003])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity(dtype, V, mode):
    x, labels, coef = _inputs(3, 5, V, DTYPES[dtype])
    _check(x, labels, coef, mode=mode)


OPTIONS = {
    "softcap-saturating": dict(softcap=8.0),
    "softcap-gentle": dict(softcap=60.0),  # the small-argument branch of tanh
    "temperature-cold": dict(temperature=0.7),
    "temperature-hot": dict(temperature=2.5),
    "softcap-and-temperature": dict(softcap=15.0, temperature=1.3),
}


@pytest.mark.parametrize("mode", ["var", "logps_bwd"])
@pytest.mark.parametrize("case", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_parity_options(dtype, case, mode):
    x, labels, coef = _inputs(2, 5, 1000, DTYPES[dtype])
    _check(x, labels, coef, mode=mode, **OPTIONS[case])


@pytest.mark.parametrize("case", ["softcap-saturating", "softcap-and-temperature"])
def test_parity_options_long_row(case):
    """softcap at V = 32003: beyond the softcap cap of the table, but the kernel is still exact."""
    x, labels, coef = _inputs(2, 3, 32003, torch.bfloat16)
    _check(x, labels, coef, **OPTIONS[case])


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_ignored(dtype):
    x, labels, coef = _inputs(2, 4, 1000, DTYPES[dtype], ignored_rows=(0, 1))
    lp, lse, grad = _check(x, labels, coef)
    assert bool((lp == 0).all()) and bool((lse == 0).all()) and bool((grad == 0).all())


def test_masked_vocabulary():
    """−inf logits (a masked vocabulary) get probability 0 and a zero gradient, as in the tiled kernel."""
    x, labels, coef = _inputs(2, 4, 1000, torch.float32)
    x[..., 900:] = float("-inf")
    labels = torch.where(labels >= 900, labels - 900, labels)
    lp, lse, grad = _check(x, labels, coef)
    assert bool((grad[..., 900:] == 0).all())


def test_matches_tiled_kernel_on_one_tile():
    """V ≤ MAX_FUSED_SIZE: the tiled kernel's one online step is the single kernel's block sum, so
    lp and lse are bitwise equal. The gradients differ by the tiled kernel's rounding of the argument
    of exp((z − m) − log s), |z − m| ≲ 30 here: ulp(32)·ln 2 ≈ 2.6e-6 relative (the single kernel's
    e/s does not round that argument); both are checked against the truth by the other tests."""
    x, labels, coef = _inputs(3, 5, 4000, torch.float32)
    flat = labels.flatten()
    g1, g2 = torch.empty_like(x), torch.empty_like(x)
    lp1, lse1 = launch_token(x, flat, coef, g1, None, kernel="single")
    lp2, lse2 = launch_token(x, flat, coef, g2, None, kernel="tiled")
    assert torch.equal(lp1, lp2) and torch.equal(lse1, lse2)
    torch.testing.assert_close(g1, g2, rtol=4e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_inplace_and_strided(dtype):
    """Gradient over the logits (grad_ptr aliasing x) and logits with a vocabulary stride ≠ 1 give
    the gradient of the contiguous out-of-place run, bit for bit."""
    x, labels, coef = _inputs(2, 3, 1000, DTYPES[dtype])
    flat = labels.flatten()
    grad = torch.empty_like(x)
    lp, lse = launch_token(x, flat, coef, grad, None)
    y = x.clone()
    lp_i, lse_i = launch_token(y, flat, coef, y, None)
    assert torch.equal(lp, lp_i) and torch.equal(lse, lse_i) and torch.equal(grad, y)
    xs = x.transpose(1, 2).contiguous().transpose(1, 2)  # stride_xv = T
    gs = torch.empty_like(xs)
    lp_s, _ = launch_token(xs, flat, coef, gs, None)
    assert xs.stride(2) != 1 and torch.equal(lp, lp_s) and torch.equal(grad, gs)


def test_auto_configuration_runs_single_pass():
    """The table picks the single-pass kernel at V = 32003 in fp32 without softcap, and its result passes."""
    kernel, block, num_warps = K.token_kernel_config(32003, torch.float32)
    assert kernel is K._token_kernel_single and (block, num_warps) == (32768, 32)
    x, labels, coef = _inputs(2, 3, 32003, torch.float32)
    _check(x, labels, coef, kernel="auto")


# --------------------------------------------------------------------------------------------
# configuration table


def test_token_kernel_config():
    single, tiled = K._token_kernel_single, K._token_kernel
    cfg = K.token_kernel_config
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    two_pass = (tiled, K.MAX_FUSED_SIZE, K.TOKEN_NUM_WARPS)
    assert cfg(1000, f32) == (single, 1024, 4)
    assert cfg(8000, bf16) == (single, 8192, 8)
    assert cfg(32000, f32) == cfg(32000, bf16) == cfg(32000, f16) == (single, 32768, 32)
    assert cfg(K.SINGLE_PASS_MAX_V, f16) == (single, K.SINGLE_PASS_MAX_V, 32)
    assert cfg(32003, f32) == (single, 32768, 32)
    assert cfg(K.SINGLE_PASS_MAX_V + 1, f32) == two_pass
    assert cfg(128256, bf16) == cfg(256000, f32) == two_pass
    # 16 values per thread: softcap, or unaligned 16-bit rows (V not a multiple of 8)
    assert cfg(16000, f32, softcap=30.0) == (single, 16384, 32)
    assert cfg(4000, f32, softcap=30.0) == (single, 4096, 8)
    assert cfg(32000, f32, softcap=30.0) == two_pass
    assert cfg(16003, bf16) == (single, 16384, 32)
    assert cfg(32003, bf16) == cfg(32003, f16) == two_pass
    for V in (1, 1000, 5000, 16003, 16384, 32003, 32768):  # every thread holds at most 32 values
        for dtype in (f32, bf16):
            for softcap in (None, 30.0):
                kernel, block, nw = cfg(V, dtype, softcap=softcap)
                tight = softcap is not None or (dtype == bf16 and V % 8)
                if kernel is single:
                    assert block >= V and block // (32 * nw) <= (16 if tight else 32) and 4 <= nw <= 32
    for bad in (0, -5, 3.0, True):
        with pytest.raises(ValueError, match="V must be a positive int"):
            cfg(bad, f32)
    with pytest.raises(TypeError, match="dtype must be"):
        cfg(1000, torch.int64)
