"""The C++ backend's fused-linear weight gradient without an fp32 [V, H] accumulator (varkernels/core/linear_cpu.py):

* ``gemm_f32`` (csrc/var_cpu_gemm.cpp): MKL's bf16/fp16 GEMM with an fp32 output, against float64;
* the deferred pass: with n ≤ 2·H non-ignored rows, g is kept transposed, its first H columns in
  grad_weight's own storage (the rest beside it), and turned into grad_weight = s·gᵀ·h in the backward.
  It must give what the chunked pass's fp32 accumulator gives (scaled, then rounded once), for every tile
  order hazard of writing over its own input.
"""

import pytest
import torch

import varkernels.core.linear as lin
import varkernels.core.linear_cpu as lcpu
from varkernels import fused_linear_var_loss, linear_weighted_nll
from varkernels.core.token import TokenOptions, kernel_coef

HALF = [torch.bfloat16, torch.float16]


def _require_f32_gemm():
    from varkernels._backend import cpu_extension_available

    if not cpu_extension_available():
        pytest.skip("the C++ extension is not built on this machine")
    if not lcpu.f32_gemm_available():
        pytest.skip("this PyTorch build does not link MKL's half-precision GEMMs (has_f32_gemm() is false)")


# ------------------------------------------------------------------------------------------ gemm_f32


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_f32_matches_float64(dtype, ta, tb):
    """c = alpha·a@b + beta·c with fp32 sums of exact half-precision products: within fp32 rounding of float64."""
    _require_f32_gemm()
    g = torch.Generator().manual_seed(0)
    M, K, N = 37, 300, 23
    a = torch.randn(K, M, generator=g).to(dtype).t() if ta else torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, K, generator=g).to(dtype).t() if tb else torch.randn(K, N, generator=g).to(dtype)
    c0 = torch.randn(M, N, generator=g)
    truth = 0.25 * (a.double() @ b.double()) + 2.0 * c0.double()
    c = c0.clone()
    torch.ops.varkernels.gemm_f32(a, b, c, 0.25, 2.0)
    bound = 8 * K * 2**-24 * (0.25 * (a.double().abs() @ b.double().abs()) + 2 * c0.double().abs())
    assert ((c.double() - truth).abs() <= bound).all()


def test_gemm_f32_edge_cases_and_errors():
    _require_f32_gemm()
    a, b = torch.ones(3, 0, dtype=torch.bfloat16), torch.ones(0, 4, dtype=torch.bfloat16)
    c = torch.full((3, 4), 2.0)
    torch.ops.varkernels.gemm_f32(a, b, c, 1.0, 0.5)  # K = 0: c = beta·c
    assert torch.equal(c, torch.ones(3, 4))
    x = torch.ones(2, 2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="c must be float32"):
        torch.ops.varkernels.gemm_f32(x, x, torch.zeros(2, 2, dtype=torch.bfloat16), 1.0, 0.0)
    with pytest.raises(TypeError, match="must both be bfloat16 or both float16"):
        torch.ops.varkernels.gemm_f32(x, x.half(), torch.zeros(2, 2), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="shapes do not chain"):
        torch.ops.varkernels.gemm_f32(x, torch.ones(3, 2, dtype=torch.bfloat16), torch.zeros(2, 2), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="row-contiguous"):
        torch.ops.varkernels.gemm_f32(torch.ones(4, 4, dtype=torch.bfloat16)[::2, ::2], x, torch.zeros(2, 2), 1.0, 0.0)


def test_mkl_gemm_switch(monkeypatch):
    """VARKERNELS_MKL_GEMM=0 turns gemm_f32 off (the fp32-copy path runs); the answer is asked once per process."""
    _require_f32_gemm()
    monkeypatch.setattr(lcpu, "_F32_GEMM", {})
    monkeypatch.setenv("VARKERNELS_MKL_GEMM", "0")
    assert not lcpu.f32_gemm_available()
    monkeypatch.setattr(lcpu, "_F32_GEMM", {})
    monkeypatch.delenv("VARKERNELS_MKL_GEMM")
    assert lcpu.f32_gemm_available()


@pytest.mark.parametrize("dtype", HALF)
def test_accumulate_weight_grad_cpu_backend_uses_gemm_f32(dtype):
    """backend="cpu": gw += gᵀ·h through gemm_f32 (no fp32 copies), equal to the fp32 GEMM up to summation order."""
    _require_f32_gemm()
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(300, 1000, generator=g).to(dtype)
    h_c = torch.randn(300, 256, generator=g).to(dtype)
    acc = torch.randn(1000, 256, generator=g)
    truth = acc.double() + grad.t().double() @ h_c.double()
    out = lin._accumulate_weight_grad(acc.clone(), grad, h_c, "cpu")
    fp32 = acc.clone().addmm_(grad.t().float(), h_c.float())
    err, ref_err = (out.double() - truth).abs().max().item(), (fp32.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)


# ------------------------------------------------------------------------------------------ the deferred pass


def _inputs(B, T, H, V, dtype, n_targets, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g).to(dtype)
    W = (torch.randn(V, H, generator=g) * H**-0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    y = torch.full((B * T,), -100, dtype=torch.long)
    pos = torch.randperm(B * T, generator=g)[:n_targets]
    y[pos] = torch.randint(0, V, (n_targets,), generator=g)
    dlp = -torch.rand(B * T, generator=g) / 5
    return h, W, b, y, dlp


def _accumulator_grads(h, W, b, y, dlp, backend, chunk, scale):
    """The chunked pass's fp32 accumulators, scaled, rounded once to the parameters' dtype: what the deferred
    pass must reproduce (the same bf16 logits gradient g; only the fp32 summation order differs)."""
    opts = TokenOptions(backend, chunk_size=chunk)
    lp, lse, gh, gw, gb = lin.linear_token_pass(h, W, b, y, kernel_coef(dlp), None, (True, True, b is not None), opts)
    return lp, gh, (gw * scale).to(W.dtype), (gb * scale).to(W.dtype) if b is not None else None


def _assert_within_one_rounding(got, want):
    """Equal, except where the fp32 sums differ in order and land on either side of a rounding boundary:
    those entries differ by one unit in the last place of the parameter dtype."""
    assert got.dtype == want.dtype and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    fi = torch.finfo(want.dtype)  # one ulp: eps·|x| for normal values, eps·tiny among the subnormals (fp16)
    ulp = (fi.eps * torch.maximum(got.float().abs(), want.float().abs())).clamp(min=fi.eps * fi.tiny)
    assert (diff <= ulp * 1.0001).all(), (diff - ulp).max()
    assert (diff > 0).float().mean() < 0.01  # rare: a GEMM-order effect, not a systematic error


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n_targets,H,bias,chunk", [
    (40, 40, False, 7),    # n = H: gᵀ fills the whole storage (row v of gᵀ is row v of grad_weight)
    (25, 40, False, 7),    # n < H: each tile's rows of grad_weight cover gᵀ rows of the tiles after it
    (1, 64, False, 262),   # one row
    (30, 64, True, 4),     # with a bias, chunks of 4
    (16, 512, False, 5),   # n much smaller than H
    (50, 40, False, 7),    # H < n ≤ 2·H: 10 columns of gᵀ beside the storage, a chunk across the boundary
    (80, 40, True, 262),   # n = 2·H, one chunk
])
def test_deferred_equals_accumulator_scaled_then_rounded(dtype, n_targets, H, bias, chunk, monkeypatch):
    _require_f32_gemm()
    backend = "cpu"
    monkeypatch.setattr(lcpu, "FINISH_TILE_BYTES", 4 * H * 3)  # 3 vocabulary rows per tile: many tiles
    B, T, V = 2, 50, 301
    h, W, b, y, dlp = _inputs(B, T, H, V, dtype, n_targets, bias=bias)
    scale = 0.37
    lp_ref, gh_ref, gw_ref, gb_ref = _accumulator_grads(h, W, b, y, dlp, backend, chunk, scale)

    opts = TokenOptions(backend, chunk_size=chunk)
    wants = (True, True, bias)
    assert lcpu.forward_pass_applies(h, W, wants, opts)
    lp, lse, gh, gb, deferred = lcpu.forward_pass(h, W, b, y, kernel_coef(dlp), wants, opts)
    assert torch.equal(lp, lp_ref)  # the same chunks of the same logits
    gw = lcpu.finish_weight_grad(deferred, torch.tensor(scale))
    assert gw.data_ptr() == deferred.storage.data_ptr()  # written over its own storage
    _assert_within_one_rounding(gw, gw_ref)
    assert torch.equal((gh.float() * scale).to(dtype), (gh_ref.float() * scale).to(dtype))
    if bias:
        assert torch.equal((gb * scale).to(dtype), gb_ref)


def test_a_wrong_tile_order_is_caught(monkeypatch):
    """The check above fails when the tiles go first to last: writing rows v0…v1 of grad_weight then destroys
    gᵀ rows that later tiles read (this is the hazard the backward order exists for)."""
    _require_f32_gemm()
    monkeypatch.setattr(lcpu, "FINISH_TILE_BYTES", 4 * 40 * 3)
    h, W, b, y, dlp = _inputs(2, 30, 40, 301, torch.bfloat16, 25)  # n = 25 < H = 40
    _, _, gw_ref, _ = _accumulator_grads(h, W, b, y, dlp, "cpu", 7, 1.0)
    opts = TokenOptions("cpu", chunk_size=7)
    *_, deferred = lcpu.forward_pass(h, W, b, y, kernel_coef(dlp), (True, True, False), opts)
    storage, _, h_rows = deferred
    V, H = storage.shape
    g_t = storage.view(-1)[: V * h_rows.shape[0]].view(V, h_rows.shape[0])
    for v0 in range(0, V, 3):  # the wrong order
        v1 = min(V, v0 + 3)
        storage[v0:v1].copy_(g_t[v0:v1].float() @ h_rows.float())
    with pytest.raises(AssertionError):
        _assert_within_one_rounding(storage, gw_ref)


def test_deferred_pass_is_chosen_only_where_it_applies(monkeypatch):
    """backend="cpu", n ≤ 2·H in half precision with the fp32 accumulator: deferred. n > 2·H: the deferred pass
    declines and the chunked pass runs. fp32, accum_fp32=False, no weight gradient, another backend: never asked."""
    _require_f32_gemm()
    taken = []
    real = lcpu.forward_pass
    monkeypatch.setattr(lcpu, "forward_pass", lambda *a: taken.append(real(*a) is not None) or real(*a))

    def run(n_targets, H, backend="cpu"):
        taken.clear()
        h, W, _, y, _ = _inputs(2, 20, H, 97, torch.bfloat16, n_targets)
        h.requires_grad_(), W.requires_grad_()
        linear_weighted_nll(h, W, y.view(2, 20), torch.rand(2), backend=backend).backward()
        return taken

    assert run(10, 16) == [True]
    assert run(20, 16) == [True]  # H < n ≤ 2·H: the columns past H in a second tensor
    assert run(33, 16) == [False]  # n > 2·H: the chunked pass
    assert run(10, 16, backend="torch") == []  # the C++ backend's path only
    declined = [("cpu", torch.float32, True, (True, True, False)),
                ("cpu", torch.bfloat16, False, (True, True, False)),
                ("cpu", torch.bfloat16, True, (True, False, False)),
                ("torch", torch.bfloat16, True, (True, True, False))]
    for backend, dtype, accum, wants in declined:
        h, W, _, y, dlp = _inputs(2, 20, 16, 97, dtype, 10)
        opts = TokenOptions(backend, chunk_size=8, accum_fp32=accum)
        assert not lcpu.forward_pass_applies(h, W, wants, opts)


def test_deferred_public_loss_matches_the_chunked_pass(monkeypatch):
    """fused_linear_var_loss through the deferred pass against the same call forced onto the chunked pass, with an
    upstream scale that is not 1: grad_weight within one rounding, the loss and grad_hidden bitwise equal;
    the inputs are unchanged; a second backward through the graph raises."""
    _require_f32_gemm()
    backend = "cpu"
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 3, 12, 48, 500
    h0 = torch.randn(B, T, H, generator=g).bfloat16()
    W0 = (torch.randn(V, H, generator=g) * H**-0.5).bfloat16()
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :4] = -100
    R, Q = torch.randn(B, B, generator=g), -torch.rand(B, B, generator=g)

    def run():
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        loss = fused_linear_var_loss(h, W, y, R, Q, backend=backend, chunk_size=5)
        (0.3 * loss).backward()
        return loss.detach(), h.grad, W.grad

    deferred = run()
    monkeypatch.setattr(lcpu, "forward_pass_applies", lambda *a: False)
    chunked = run()
    monkeypatch.undo()
    assert torch.equal(deferred[0], chunked[0]) and torch.equal(deferred[1], chunked[1])
    _assert_within_one_rounding(deferred[2], chunked[2])
    assert torch.equal(run()[2], deferred[2])  # deterministic

    h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    loss = fused_linear_var_loss(h, W, y, R, Q, backend=backend, chunk_size=5)
    loss.backward(retain_graph=True)
    assert torch.equal(h.detach(), h0) and torch.equal(W.detach(), W0)
    with pytest.raises(RuntimeError, match="backward was called twice|modified by an inplace"):
        loss.backward()
