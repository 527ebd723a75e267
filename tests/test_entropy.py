"""The policy's entropy from the token op's logsumexp sweep (issue 27, item 2; docs/design.md §1.9, §2.1).

The token op takes an optional output ``entropy`` [B·T] fp32 and writes −Σ_v p_v·log p_v of each row's
softmax of the *transformed* logits (softcap, temperature), 0 for ignored rows, from one more running
sum in the sweep that computes the logsumexp. The public forms: ``sequence_logps(..., return_entropy=True)``,
``linear_sequence_logps(..., return_entropy=True)`` → (logps, entropy [B]) and ``NLLOutput.entropy`` of the
weighted NLL with ``return_aux=True``: per sequence, the mean over its non-ignored tokens (0 without any).

Checked under the tolerance policy (helpers.assert_close): the float64 truth is computed from the same
(dtype-rounded) logits, the yardstick ``ref`` is PyTorch in fp32 on them (``torch.distributions``), on every
backend, logits and fused-linear forms, fp32 / bf16, softcap and temperature, ignored rows and masked (−inf)
logits; the tiled Triton kernel with several tiles (forced at V = 5000, and through the configuration
table at V = 40000); and that asking for the entropy changes neither the log-probs nor the gradients,
bitwise.
"""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE_INDEX, assert_close, make_labels, make_logits, require_backend

from varkernels import NLLOutput, linear_sequence_logps, linear_weighted_nll, sequence_logps, weighted_nll
from varkernels.core.token import token_kernel
from varkernels.reference import transform_logits

BACKENDS = ("cpu", "torch", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TRANSFORMS = {"plain": dict(), "softcap_temp": dict(softcap=8.0, temperature=0.7)}


def token_entropy_reference(z: torch.Tensor) -> torch.Tensor:
    """[..., V] transformed logits → [...] entropy of their softmax, in z's dtype (torch.distributions)."""
    return torch.distributions.Categorical(logits=z).entropy()


def sequence_entropy_reference(logits, labels, *, dtype, softcap=None, temperature=1.0, shift_labels=False):
    """[B] mean token entropy over the non-ignored positions of each row (0 without any), computed in ``dtype``
    from ``logits`` (already rounded to the kernel's input dtype)."""
    z = transform_logits(logits.detach().to(dtype), softcap, temperature)
    h = token_entropy_reference(z)
    y = labels
    if shift_labels:
        y = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    m = (y != IGNORE_INDEX).to(dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def _case(B=3, T=6, V=1000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = make_labels(B, T, V, ignored_rows=(1,), generator=g)
    x = make_logits(B, T, V, dtype, labels=torch.where(labels == IGNORE_INDEX, 0, labels), requires_grad=False,
                    generator=g)
    return x, labels


def _check(ent, x, labels, **kw):
    truth = sequence_entropy_reference(x, labels, dtype=torch.float64, **kw)
    ref = sequence_entropy_reference(x, labels, dtype=torch.float32, **kw)
    assert ent.dtype == torch.float32 and ent.shape == truth.shape and ent.grad_fn is None
    assert_close(ent, ref, truth, name="entropy")


# --------------------------------------------------------------------------------------------
# the token op, every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_token_op_entropy(backend, transform):
    """Per-row entropy of the op, masked (−inf) logits and ignored rows (0) included; lp and lse unchanged
    bitwise; the gradient mode (coef, grad) writes the same entropy and the same gradient."""
    require_backend(backend)
    kw = TRANSFORMS[transform]
    x, labels = _case(B=2, T=5, V=5000)
    x[0, 2, :3000] = float("-inf")  # a masked vocabulary: the C++ kernel's first block, a whole Triton tile
    x[0, 2, 3500] = 5.0
    y = labels.reshape(-1).contiguous()
    y[2] = 3500
    opts = dict(softcap=kw.get("softcap"), inv_temperature=1.0 / kw.get("temperature", 1.0), ignore_index=IGNORE_INDEX)
    op = token_kernel(backend)
    ent = torch.full((y.numel(),), float("nan"))
    lp, lse = op(x, y, None, None, None, **opts, entropy=ent)
    lp0, lse0 = op(x, y, None, None, None, **opts)
    assert torch.equal(lp, lp0) and torch.equal(lse, lse0)

    z = transform_logits(x, kw.get("softcap"), kw.get("temperature", 1.0)).reshape(-1, x.shape[-1])
    valid = y != IGNORE_INDEX
    truth = torch.where(valid, token_entropy_reference(z.double()), 0.0)
    ref = torch.where(valid, token_entropy_reference(z.float()), 0.0)
    assert_close(ent, ref, truth, name="token entropy")
    assert torch.all(ent[~valid] == 0)

    coef = torch.randn(y.numel())
    g_ent, g0 = torch.empty_like(x), torch.empty_like(x)
    ent_g = torch.empty_like(ent)
    lp_g, _ = op(x, y, coef, g_ent, None, **opts, entropy=ent_g)
    lp_g0, _ = op(x, y, coef, g0, None, **opts)
    assert torch.equal(lp_g, lp_g0) and torch.equal(g_ent, g0) and torch.equal(ent_g, ent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_op_entropy_is_not_with_lse_in(backend):
    require_backend(backend)
    x, labels = _case(B=1, T=2, V=50)
    y = labels.reshape(-1).contiguous()
    with pytest.raises((ValueError, RuntimeError), match="lse_in"):
        token_kernel(backend)(x, y, torch.ones(2), torch.empty_like(x), torch.zeros(2), softcap=None,
                              inv_temperature=1.0, ignore_index=IGNORE_INDEX, entropy=torch.empty(2))


@pytest.mark.parametrize("softcap", [None, 8.0])
def test_tiled_triton_kernel_entropy(softcap):
    """The tiled two-sweep kernel, forced at V = 5000 (two tiles of 4096, the second masked), with the first
    tile all −inf in one row (the running sum is 0 when the second tile moves the max), against the single-pass
    kernel's entropy and the truth."""
    from token_launch import launch_token

    x, labels = _case(B=2, T=4, V=5000)
    x[1, 1, :4096] = float("-inf")
    y = labels.reshape(-1).contiguous()
    y[5] = 4500
    valid = y != IGNORE_INDEX
    z = transform_logits(x, softcap, 1.3).reshape(-1, x.shape[-1])
    truth = torch.where(valid, token_entropy_reference(z.double()), 0.0)
    ref = torch.where(valid, token_entropy_reference(z.float()), 0.0)
    out = {}
    for kernel in ("tiled", "single"):
        ent = torch.full((y.numel(),), float("nan"))
        launch_token(x, y, None, None, None, softcap=softcap, temperature=1.3, kernel=kernel, entropy=ent)
        assert_close(ent, ref, truth, name=f"{kernel} entropy")
        out[kernel] = ent
    torch.testing.assert_close(out["tiled"], out["single"], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# public functions


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_sequence_logps_entropy(backend, dtype, transform):
    require_backend(backend)
    kw = TRANSFORMS[transform]
    x, labels = _case(dtype=DTYPES[dtype])
    x.requires_grad_()
    logps, ent = sequence_logps(x, labels, return_entropy=True, shift_labels=True, backend=backend, **kw)
    _check(ent, x, labels, shift_labels=True, **kw)
    assert ent[1] == 0  # a row without tokens
    assert logps.requires_grad and not ent.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_linear_sequence_logps_entropy(backend, dtype, transform):
    """Fused-linear form, several chunks: the entropy of the logits h·Wᵀ (+ b) as the GEMM dtype rounds them."""
    require_backend(backend)
    kw = TRANSFORMS[transform]
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 7, 32, 700
    labels = make_labels(B, T, V, ignored_rows=(2,), generator=g)
    h = torch.randn(B, T, H, generator=g).to(dt).requires_grad_()
    W = (torch.randn(V, H, generator=g) / 2).to(dt).requires_grad_()
    b = torch.randn(V, generator=g).to(dt)
    _, ent = linear_sequence_logps(h, W, labels, bias=b, return_entropy=True, chunk_size=5, backend=backend, **kw)
    logits = torch.addmm(b, h.detach().reshape(-1, H), W.detach().t()).view(B, T, V)  # rounded to dt
    _check(ent, logits, labels, **kw)
    assert ent[2] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["logits", "linear"])
def test_nll_output_entropy(backend, form):
    require_backend(backend)
    kw = TRANSFORMS["softcap_temp"]
    g = torch.Generator().manual_seed(2)
    B, T, H, V = 4, 6, 24, 400
    labels = make_labels(B, T, V, ignored_rows=(3,), generator=g)
    weights = torch.randn(B, generator=g)
    if form == "logits":
        x = torch.randn(B, T, V, generator=g).mul_(3).requires_grad_()
        out = weighted_nll(x, labels, weights, reduction="sum", return_aux=True, backend=backend, **kw)
        logits = x
    else:
        h = torch.randn(B, T, H, generator=g).requires_grad_()
        W = torch.randn(V, H, generator=g).requires_grad_()
        out = linear_weighted_nll(h, W, labels, weights, reduction="sum", return_aux=True, chunk_size=7,
                                  backend=backend, **kw)
        logits = h.detach() @ W.detach().t()
    assert isinstance(out, NLLOutput)
    _check(out.entropy, logits, labels, **kw)  # the same per-token mean, whatever the reduction
    assert out.entropy[3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["logits", "linear"])
def test_per_token_entropy_with_reduction_none(backend, form):
    """reduction="none": the entropy per token [B, T] like the log-probs (shifted with the labels, 0 where the
    label is ignored), what GRPO's top_entropy_quantile filter needs (OnlineVARTrainer); its row means are
    the entropy of reduction="mean"."""
    require_backend(backend)
    kw = TRANSFORMS["softcap_temp"]
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 3, 7, 24, 600
    labels = make_labels(B, T, V, ignored_rows=(1,), generator=g)
    if form == "logits":
        x = torch.randn(B, T, V, generator=g).mul_(3)
        logits, args, fn = x, (x,), sequence_logps
    else:
        h, W = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
        logits, args, fn = h @ W.t(), (h, W), linear_sequence_logps
    with torch.no_grad():
        lp, ent = fn(*args, labels, reduction="none", return_entropy=True, shift_labels=True, backend=backend, **kw)
        _, mean = fn(*args, labels, reduction="mean", return_entropy=True, shift_labels=True, backend=backend, **kw)
    y = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    valid = y != IGNORE_INDEX
    z = transform_logits(logits, kw["softcap"], kw["temperature"])
    truth = torch.where(valid, token_entropy_reference(z.double()), 0.0)
    ref = torch.where(valid, token_entropy_reference(z.float()), 0.0)
    assert ent.shape == lp.shape == (B, T) and ent.dtype == torch.float32
    assert_close(ent, ref, truth, name="per-token entropy")
    assert torch.all(ent[~valid] == 0) and torch.all(ent[valid] > 0)
    torch.testing.assert_close(ent.sum(1) / valid.sum(1).clamp(min=1), mean, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# asking for the entropy changes nothing else


def _grads(*ts):
    return [t.grad.clone() for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_changes_neither_logps_nor_gradients(backend, dtype):
    require_backend(backend)
    dt = DTYPES[dtype]
    kw = dict(softcap=8.0, temperature=0.7, backend=backend)
    x0, labels = _case(V=3000, dtype=dt)
    weights = torch.randn(3, 6)

    def logps(return_entropy):
        x = x0.clone().requires_grad_()
        out = sequence_logps(x, labels, reduction="sum", return_entropy=return_entropy, **kw)
        lp = out[0] if return_entropy else out
        (lp * torch.arange(1.0, 4.0)).sum().backward()
        return lp, x.grad

    def nll(return_aux, inplace=False):
        leaf = x0.clone().requires_grad_()
        x = leaf * 1.0 if inplace else leaf  # a non-leaf may be overwritten by its gradient
        out = weighted_nll(x, labels, weights, return_aux=return_aux, inplace=inplace, **kw)
        (out.loss if return_aux else out).backward()
        return (out.loss if return_aux else out), leaf.grad

    for fn, args in ((logps, ()), (nll, ()), (nll, (True,))):
        a, b = fn(True, *args), fn(False, *args)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (fn.__name__, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_entropy_changes_neither_logps_nor_gradients(backend, dtype):
    """Both fused-linear modes; with the C++ backend and bf16 (n ≤ 2·H rows) the forward mode takes the deferred
    weight-gradient pass of core/linear_cpu.py, which writes the entropy too."""
    require_backend(backend)
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 9, 32, 500
    labels = make_labels(B, T, V, generator=g)
    h0 = torch.randn(B, T, H, generator=g).to(dt)
    W0 = torch.randn(V, H, generator=g).to(dt)
    weights = torch.randn(B, generator=g)
    kw = dict(chunk_size=4, softcap=8.0, backend=backend)

    def run(fn, flag):
        h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
        if fn is linear_sequence_logps:
            out = fn(h, W, labels, reduction="sum", return_entropy=flag, **kw)
            value = (out[0] if flag else out).sum()
            ent = out[1] if flag else None
        else:
            out = fn(h, W, labels, weights, return_aux=flag, **kw)
            value = out.loss if flag else out
            ent = out.entropy if flag else None
        value.backward()
        return value, h.grad, W.grad, ent

    for fn in (linear_sequence_logps, linear_weighted_nll):
        a, b = run(fn, True), run(fn, False)
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])), fn.__name__
        logits = (h0.float() @ W0.float().t()).to(dt)
        _check(a[3], logits, labels, softcap=8.0)


def test_no_grad_entropy():
    """Reference scoring under no_grad: the entropy comes with the log-probs, nothing is saved."""
    x, labels = _case()
    x.requires_grad_()
    with torch.no_grad():
        logps, ent = sequence_logps(x, labels, return_entropy=True, backend="torch")
    assert logps.grad_fn is None and ent.grad_fn is None
    _check(ent, x, labels)


def test_return_entropy_must_be_a_bool():
    x, labels = _case(B=1, T=2, V=20)
    with pytest.raises(TypeError, match="return_entropy must be a bool"):
        sequence_logps(x, labels, return_entropy=1, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_take_the_tiled_kernel(backend):
    """V = 40000 > 32768: the configuration table's tiled Triton kernel (10 tiles), the C++ kernel's 20 blocks
    (about a second in the interpreter: in the default run)."""
    require_backend(backend)
    from varkernels.core._triton_kernels import _token_kernel, token_kernel_config

    assert token_kernel_config(40000, torch.float32)[0] is _token_kernel
    x, labels = _case(B=2, T=3, V=40000)
    _, ent = sequence_logps(x, labels, return_entropy=True, backend=backend, temperature=0.5)
    _check(ent, x, labels, temperature=0.5)
