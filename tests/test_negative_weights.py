"""Mixed-sign weights in every kernel path of the weighted NLL (issue 27: online VAR's centred weights w − 1).

``varkernels.weighted_nll`` and ``varkernels.linear_weighted_nll`` with per-sequence and per-token weights of
both signs (exact −1 and 0 among them: a centred weight whose softmax underflowed, an unscorable completion)
against ``weighted_nll_reference`` / ``linear_weighted_nll_reference``: loss, policy_logps and every gradient,
with the tolerance policy of ``helpers.assert_close`` (the PyTorch reference in the kernel's input dtype as the
yardstick, computed in fp32 inside, and a float64 truth), on the "cpu", "torch" and "triton" (interpreter)
backends in fp32 and bf16, forward mode (the default). Then the C++ backend's bf16 deferred weight-gradient
pass (n ≤ 2·H non-ignored rows), checked to be the path taken.
"""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE_INDEX, assert_close, lp_atol, make_labels, make_logits, require_backend

import varkernels.core.linear_cpu as lcpu
from varkernels import linear_weighted_nll, weighted_nll
from varkernels.reference import linear_weighted_nll_reference, weighted_nll_reference

BACKENDS = ("cpu", "torch", "triton")
DTYPES = (torch.float32, torch.bfloat16)


def signed_weights(labels: torch.Tensor, form: str, seed: int = 0) -> torch.Tensor:
    """[N] or [N, T] fp32 weights of both signs, with exact −1 and 0 entries."""
    g = torch.Generator().manual_seed(seed)
    N, T = labels.shape
    w = torch.randn((N,) if form == "sequence" else (N, T), generator=g) * 1.5
    w.view(-1)[0], w.view(-1)[1] = -1.0, 0.0
    assert (w < 0).any() and (w > 0).any()
    return w


def coefficient_sizes(weights, labels, reduction) -> torch.Tensor:
    """|d loss / d lp[i, t]| = |w[i, t]|·c_i/N at the non-ignored tokens, float64 (for helpers.lp_atol)."""
    mask = (labels != IGNORE_INDEX).double()
    w = weights.double().abs()
    w = w.unsqueeze(1).expand_as(mask) if w.dim() == 1 else w
    n = mask.sum(1, keepdim=True)
    c = torch.ones_like(n) if reduction == "sum" else 1.0 / n.clamp(min=1)
    return w * c * mask / labels.shape[0]


def run(f, tensors, labels, weights, dtype, **kw):
    """f on fresh leaf copies of ``tensors`` (logits, or hidden / weight / bias) in ``dtype``: loss, aux, grads."""
    ts = [t.detach().to(dtype).clone().requires_grad_() for t in tensors]
    w = weights.double() if dtype == torch.float64 else weights
    if len(ts) == 1:
        out = f(ts[0], labels, w, return_aux=True, **kw)
    else:
        out = f(ts[0], ts[1], labels, w, bias=ts[2], return_aux=True, **kw)
    loss, s = out[:2]  # NLLOutput(loss, policy_logps, entropy), or the reference's (loss, policy_logps)
    loss.backward()
    return loss, s, [t.grad for t in ts]


def check(fn, ref_fn, tensors, labels, weights, dtype, reduction, **kw):
    """fn against ref_fn in ``dtype`` (the yardstick) and in float64 (the truth): loss, policy_logps, grads."""
    loss, s, grads = run(fn, tensors, labels, weights, dtype, reduction=reduction, **kw)
    ref = run(ref_fn, tensors, labels, weights, dtype, reduction=reduction)
    truth = run(ref_fn, tensors, labels, weights, torch.float64, reduction=reduction)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert_close(loss, ref[0], truth[0], name="loss", atol_floor=lp_atol(coefficient_sizes(weights, labels, reduction)))
    c = coefficient_sizes(torch.ones(labels.shape[0]), labels, reduction) * labels.shape[0]
    assert_close(s, ref[1], truth[1], name="policy_logps", atol_floor=lp_atol(c.sum(1).max()))
    names = ("grad_logits",) if len(tensors) == 1 else ("grad_hidden", "grad_weight", "grad_bias")
    for name, o, r, t in zip(names, grads, ref[2], truth[2]):
        assert o.dtype == dtype, name
        assert_close(o, r, t, name=name)


@pytest.mark.parametrize("form,reduction", [("sequence", "mean"), ("token", "sum"), ("token", "mean")])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_form_with_mixed_sign_weights(dtype, backend, form, reduction):
    require_backend(backend)
    g = torch.Generator().manual_seed(1)
    labels = make_labels(4, 9, 301, ignored_rows=(3,), generator=g)
    logits = make_logits(4, 9, 301, labels=labels, generator=g).detach().double()
    weights = signed_weights(labels, form)
    check(weighted_nll, weighted_nll_reference, [logits], labels, weights, dtype, reduction, backend=backend)


def linear_inputs(B, T, H, V, seed=2):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    return h, W, b


@pytest.mark.parametrize("form,reduction,chunk", [("sequence", "mean", None), ("token", "sum", 4),
                                                  ("token", "mean", 3)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_form_with_mixed_sign_weights(dtype, backend, form, reduction, chunk):
    require_backend(backend)
    h, W, b = linear_inputs(3, 11, 40, 257)
    labels = make_labels(3, 11, 257, generator=torch.Generator().manual_seed(3))
    weights = signed_weights(labels, form, seed=4)
    check(linear_weighted_nll, linear_weighted_nll_reference, [h, W, b], labels, weights, dtype, reduction,
          backend=backend, chunk_size=chunk)


@pytest.mark.parametrize("form", ["sequence", "token"])
@pytest.mark.parametrize("n_targets", [12, 70])  # n ≤ H and H < n ≤ 2·H
def test_cpu_deferred_weight_gradient_with_mixed_sign_weights(monkeypatch, form, n_targets):
    """backend="cpu", bf16, few target rows: grad_weight is computed by the deferred pass (gᵀ kept in
    grad_weight's storage, turned into s·gᵀ·h in the backward); with signed weights it matches the reference."""
    require_backend("cpu")
    if not lcpu.f32_gemm_available():
        pytest.skip("this PyTorch build does not link MKL's half-precision GEMMs (has_f32_gemm() is false)")
    taken = []
    real = lcpu.forward_pass

    def spy(*a):
        out = real(*a)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(lcpu, "forward_pass", spy)
    B, T, H, V = 4, 30, 48, 311
    h, W, b = linear_inputs(B, T, H, V, seed=5)
    g = torch.Generator().manual_seed(6)
    labels = torch.full((B * T,), IGNORE_INDEX, dtype=torch.long)
    labels[torch.randperm(B * T, generator=g)[:n_targets]] = torch.randint(0, V, (n_targets,), generator=g)
    labels = labels.view(B, T)
    weights = signed_weights(labels, form, seed=7)
    check(linear_weighted_nll, linear_weighted_nll_reference, [h, W, b], labels, weights, torch.bfloat16, "mean",
          backend="cpu", chunk_size=8)
    assert taken == [True], taken  # the deferred pass ran
