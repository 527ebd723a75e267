"""The public weighted NLL (varkernels/nll.py) against ``weighted_nll_reference``.

loss = −(1/N)·Σ_i c_i·Σ_t w[i, t]·lp[i, t] with per-sequence [N] or per-token [N, T] weights: values,
policy_logps and gradients of the Triton (interpreter), C++ and PyTorch backends against a float64
ground truth with the tolerance policy of ``helpers.assert_close``; fp32 / bf16 / fp16; odd shapes;
both reductions; the options; VAR as weights → this loss; torch.compile; grad mode; bad input.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from bad_inputs import BAD_INPUTS, assert_untouched, snapshot
from helpers import DTYPES, IGNORE_INDEX, assert_close, lp_atol, make_labels, make_logits, require_backend

import varkernels
from varkernels import NLLOutput, linear_weighted_nll, weighted_nll
from varkernels.core import linear as core_linear
from varkernels.reference import linear_weighted_nll_reference, weighted_nll_reference

BACKENDS = ("triton", "cpu", "torch")
FORMS = ("sequence", "token")


def make_weights(labels: torch.Tensor, form: str, *, generator=None) -> torch.Tensor:
    """Signed weights of either form (advantages can be negative), [N] or [N, T] fp32."""
    N, T = labels.shape
    shape = (N,) if form == "sequence" else (N, T)
    return torch.rand(shape, generator=generator) * 2.5 - 0.5


def effective_labels(labels, shift_labels, ignore_index=IGNORE_INDEX):
    if not shift_labels:
        return labels
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def token_weights(weights, labels, options) -> torch.Tensor:
    """|d loss / d lp[i, t]| = |w[i, t]|·c_i/N at the non-ignored tokens, float64 (for helpers.lp_atol)."""
    ignore_index = options.get("ignore_index", IGNORE_INDEX)
    shift = options.get("shift_labels", False)
    eff = effective_labels(labels, shift, ignore_index)
    mask = (eff != ignore_index).double()
    w = weights.double()
    if w.dim() == 1:
        w = w.unsqueeze(1).expand_as(mask)
    elif shift:
        w = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], dim=1)
    n = mask.sum(1, keepdim=True)
    c = torch.ones_like(n) if options.get("reduction", "mean") == "sum" else 1.0 / n.clamp(min=1)
    return w * c * mask / labels.shape[0]


def run(fn, logits, labels, weights, dtype, *, upstream=1.0, **options):
    """``fn`` with return_aux on a fresh leaf copy of logits in ``dtype``: (loss, policy_logps, grad)."""
    x = logits.detach().to(dtype).clone().requires_grad_()
    w = weights.double() if dtype == torch.float64 else weights
    out = fn(x, labels, w, return_aux=True, **options)
    loss, s = out[:2]  # NLLOutput (loss, policy_logps, entropy) or the reference's pair
    (loss if upstream == 1.0 else upstream * loss).backward()
    return loss, s, x.grad


def check_parity(logits, labels, weights, *, backend, dtype, upstream=1.0, **options):
    loss, s, grad = run(weighted_nll, logits, labels, weights, dtype, upstream=upstream, backend=backend, **options)
    ref = run(weighted_nll_reference, logits, labels, weights, dtype, upstream=upstream, **options)
    truth = run(weighted_nll_reference, logits, labels, weights, torch.float64, upstream=upstream, **options)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert s.dtype == torch.float32 and s.shape == (labels.shape[0],) and not s.requires_grad
    assert grad.dtype == dtype
    c_n = token_weights(torch.ones(labels.shape[0]), labels, options).sum(1) * labels.shape[0]
    assert_close(loss, ref[0], truth[0], name="loss", atol_floor=lp_atol(token_weights(weights, labels, options)))
    assert_close(s, ref[1], truth[1], name="policy_logps", atol_floor=lp_atol(c_n.max()))
    assert_close(grad, ref[2], truth[2], name="logits grad")


# --------------------------------------------------------------------------------------------
# Logits form
# --------------------------------------------------------------------------------------------

# The weights' form and the reduction only change the per-token coefficients, computed before the backend
# runs (varkernels/nll.py: token_coefficients): the dtype × backend × shape matrix takes one (form, reduction)
# per shape, and test_parity_form_and_reduction takes every pair at one shape.
SHAPES = [(1, 1, 1000, "token", "sum"), (3, 9, 1001, "sequence", "mean")]
SLOW_SHAPES = [(4, 5, 32003, "token", "mean")]  # a row of 2 to 8 BLOCK_V tiles (test_single_pass covers tiles)


def _shape_id(c):
    return "B{}-T{}-V{}-{}-{}".format(*c)


def _parity_case(dtype, backend, B, T, V, form, reduction):
    require_backend(backend)
    labels = make_labels(B, T, V, ignored_rows=(B - 1,) if B > 2 else ())
    logits = make_logits(B, T, V, labels=torch.where(labels == IGNORE_INDEX, 0, labels), requires_grad=False)
    check_parity(logits, labels, make_weights(labels, form), backend=backend, dtype=dtype, reduction=reduction)


@pytest.mark.parametrize("B,T,V,form,reduction", [
    *(pytest.param(*c, id=_shape_id(c)) for c in SHAPES),
    *(pytest.param(*c, id=_shape_id(c), marks=pytest.mark.slow) for c in SLOW_SHAPES),
])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(dtype, backend, B, T, V, form, reduction):
    _parity_case(dtype, backend, B, T, V, form, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_form_and_reduction(backend, form, reduction):
    _parity_case(torch.float32, backend, 3, 9, 1001, form, reduction)


OPTION_CASES = {
    "shift-labels": dict(shift_labels=True),
    "shift-labels-sum": dict(shift_labels=True, reduction="sum"),
    "softcap": dict(softcap=8.0),
    "temperature": dict(temperature=0.7),
    "softcap-and-temperature": dict(softcap=15.0, temperature=1.3),
    "ignore-index-minus-1": dict(ignore_index=-1),
    "upstream": dict(upstream=-2.5),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_option(backend, form, case):
    require_backend(backend)
    options = dict(OPTION_CASES[case])
    ignore_index = options.get("ignore_index", IGNORE_INDEX)
    labels = make_labels(4, 11, 1000, ignore_index=ignore_index, ignored_rows=(2,))
    logits = make_logits(4, 11, 1000, labels=torch.where(labels == ignore_index, 0, labels), requires_grad=False)
    check_parity(logits, labels, make_weights(labels, form), backend=backend, dtype=torch.float32, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_weights_shift_with_the_labels(backend):
    """With shift_labels, weights[:, t] weighs the token labels[:, t], which position t−1 predicts."""
    require_backend(backend)
    B, T, V = 2, 6, 40
    labels = make_labels(B, T, V)
    logits = torch.randn(B, T, V)
    w = make_weights(labels, "token")
    shifted = weighted_nll(logits, labels, w, shift_labels=True, reduction="sum", backend=backend)
    # the same loss, shifted by hand: logits[:, :-1] predict labels[:, 1:] with weights[:, 1:]
    by_hand = weighted_nll(logits[:, :-1], labels[:, 1:].contiguous(), w[:, 1:].contiguous(), reduction="sum",
                           backend=backend)
    torch.testing.assert_close(shifted, by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_weights_equal_constant_token_weights(backend):
    require_backend(backend)
    B, T, V = 3, 7, 129
    labels = make_labels(B, T, V, ignored_rows=(1,))
    logits = torch.randn(B, T, V)
    w = make_weights(labels, "sequence")
    for reduction in ("mean", "sum"):
        a = weighted_nll(logits, labels, w, reduction=reduction, backend=backend, return_aux=True)
        b = weighted_nll(logits, labels, w.unsqueeze(1).expand(B, T), reduction=reduction, backend=backend,
                         return_aux=True)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
        assert torch.equal(a.policy_logps, b.policy_logps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_rows_give_zero_not_nan(backend):
    require_backend(backend)
    B, T, V = 2, 4, 50
    labels = torch.full((B, T), IGNORE_INDEX)
    x = torch.randn(B, T, V, requires_grad=True)
    for form in FORMS:
        out = weighted_nll(x, labels, make_weights(labels, form), backend=backend, return_aux=True)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and torch.equal(out.policy_logps, torch.zeros(B))
        assert torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_writes_the_gradient_over_the_logits(backend):
    require_backend(backend)
    B, T, V = 3, 5, 77
    labels = make_labels(B, T, V)
    w = make_weights(labels, "token")
    base = torch.randn(B, T, V)
    ref = base.clone().requires_grad_()
    weighted_nll(ref, labels, w, backend=backend).backward()
    leaf = base.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf: inplace is for logits produced by the model
    loss = weighted_nll(x, labels, w, backend=backend, inplace=True)
    loss.backward()
    torch.testing.assert_close(x.detach(), ref.grad)  # x now holds its gradient
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_return_aux_is_a_named_tuple():
    labels = make_labels(2, 4, 30)
    out = weighted_nll(torch.randn(2, 4, 30), labels, torch.ones(2), return_aux=True)
    assert isinstance(out, NLLOutput) and out._fields == ("loss", "policy_logps", "entropy")
    plain = weighted_nll(torch.randn(2, 4, 30), labels, torch.ones(2))
    assert isinstance(plain, torch.Tensor) and plain.dtype == torch.float32 and plain.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_other_dtypes(backend):
    """bf16 / fp16 / fp64 weights are used as fp32 values (the loss accumulates in fp32)."""
    require_backend(backend)
    labels = make_labels(3, 6, 100)
    logits = torch.randn(3, 6, 100)
    w = make_weights(labels, "token").bfloat16()
    want = weighted_nll(logits, labels, w.float(), backend=backend)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        torch.testing.assert_close(weighted_nll(logits, labels, w.to(dt), backend=backend), want)


# --------------------------------------------------------------------------------------------
# VAR = VAR weights → the weighted NLL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_var_is_its_weights_into_the_weighted_nll(backend):
    """fused_var_loss equals weighted_nll with the VAR weights it reports, bitwise, and so do the gradients."""
    require_backend(backend)
    from helpers import make_pairs

    B, T, V = 4, 7, 301
    labels = make_labels(B, T, V)
    R, Q = make_pairs(labels)
    for fn_kw in (dict(logp_reduction="mean"), dict(logp_reduction="sum", shift_labels=True)):
        x1 = torch.randn(B, T, V, requires_grad=True)
        out = varkernels.fused_var_loss(x1, labels, R, Q, backend=backend, return_aux=True, **fn_kw)
        out.loss.backward()
        x2 = x1.detach().clone().requires_grad_()
        nll = weighted_nll(x2, labels, out.weights, reduction=fn_kw["logp_reduction"], backend=backend,
                           shift_labels=fn_kw.get("shift_labels", False), return_aux=True)
        nll.loss.backward()
        assert torch.equal(out.loss, nll.loss) and torch.equal(out.policy_logps, nll.policy_logps)
        assert torch.equal(x1.grad, x2.grad)


# --------------------------------------------------------------------------------------------
# Fused-linear form
# --------------------------------------------------------------------------------------------


def make_linear(B, T, H, V, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
    y = make_labels(B, T, V, ignored_rows=(B - 1,) if B > 2 else (), generator=g)
    return h, W, b, y


def run_linear(fn, h, W, b, y, weights, dtype, upstream=1.0, **kw):
    ts = [t.detach().to(dtype).clone().requires_grad_() for t in (h, W, b)]
    w = weights.double() if dtype == torch.float64 else weights
    loss, s = fn(ts[0], ts[1], y, w, bias=ts[2], return_aux=True, **kw)[:2]
    (upstream * loss).backward()
    return loss, s, [t.grad for t in ts]


# Each case takes one weights form and one reduction (they only change the coefficients, see test_parity);
# together the cases take both of each on every backend and dtype.
LINEAR_CASES = [
    dict(form="token", reduction="mean"),
    dict(form="sequence", reduction="sum", chunk_size=4),  # chunk boundaries in the middle of sequences
    dict(form="token", reduction="sum", shift_labels=True, chunk_size=3),
    dict(form="sequence", reduction="mean", softcap=2.5, temperature=0.8),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_parity(dtype, backend, case):
    require_backend(backend)
    case = dict(case)
    form = case.pop("form")
    h, W, b, y = make_linear(3, 11, 33, 1001)
    weights = make_weights(y, form)
    ref_kw = {k: v for k, v in case.items() if k != "chunk_size"}
    # the upstream scale is exercised in fp32 (in 16-bit the forward-mode gradient is rounded before
    # the scale and once after, see test_fused_linear.py)
    up = -1.5 if dtype == torch.float32 else 1.0
    truth = run_linear(linear_weighted_nll_reference, h, W, b, y, weights, torch.float64, upstream=up, **ref_kw)
    same = run_linear(linear_weighted_nll_reference, h, W, b, y, weights, dtype, upstream=up, **ref_kw)
    loss, s, grads = run_linear(linear_weighted_nll, h, W, b, y, weights, dtype, upstream=up, backend=backend, **case)
    assert loss.dtype == torch.float32 and s.shape == (3,)
    floor = lp_atol(token_weights(weights, y, case)) * abs(up)
    assert_close(loss, same[0], truth[0], name="loss", atol_floor=floor)
    c_n = token_weights(torch.ones(3), y, case).sum(1) * 3
    assert_close(s, same[1], truth[1], name="policy_logps", atol_floor=lp_atol(c_n.max()))
    for name, o, r, t in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, same[2], truth[2]):
        assert o.dtype == dtype, f"{name} dtype {o.dtype}"
        assert_close(o, r, t, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_equals_logits_form(backend):
    require_backend(backend)
    h, W, b, y = make_linear(2, 9, 16, 257)
    h, W, b = h.float(), W.float(), b.float()
    w = make_weights(y, "token")
    a = linear_weighted_nll(h, W, y, w, bias=b, chunk_size=5, backend=backend, return_aux=True)
    c = weighted_nll(torch.addmm(b, h.view(-1, 16), W.t()).view(2, 9, -1), y, w, backend=backend, return_aux=True)
    # both within the tolerance policy of one reference: plain PyTorch fp32 the yardstick, float64 the truth
    ref = linear_weighted_nll_reference(h, W, y, w, bias=b, return_aux=True)
    truth = linear_weighted_nll_reference(h.double(), W.double(), y, w.double(), bias=b.double(), return_aux=True)
    c_n = token_weights(torch.ones(2), y, {}).sum(1) * 2
    for name, out in (("linear form", a), ("logits form", c)):
        assert_close(out.loss, ref[0], truth[0], name=f"{name} loss", atol_floor=lp_atol(token_weights(w, y, {})))
        assert_close(out.policy_logps, ref[1], truth[1], name=f"{name} policy_logps", atol_floor=lp_atol(c_n.max()))


# --------------------------------------------------------------------------------------------
# Grad mode, weights that require grad, compile, the C++ kernel loaded by the primitive itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_no_grad_writes_and_saves_nothing(backend, grad_off):
    require_backend(backend)
    B, T, V = 3, 6, 257
    labels = make_labels(B, T, V)
    w = make_weights(labels, "token")
    logits = torch.randn(B, T, V).requires_grad_()
    before = logits.detach().clone()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t), grad_off():
        loss = weighted_nll(logits, labels, w, inplace=True, backend=backend)
    assert torch.equal(logits.detach(), before), "inplace=True wrote into the logits with grad mode off"
    assert logits.grad is None and not loss.requires_grad and packed == []
    assert torch.equal(loss, weighted_nll(logits, labels, w, backend=backend).detach())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_linear_no_grad_builds_no_gradient(monkeypatch, backend):
    """Under no_grad the driver is asked for no gradient: no [N, T, H] or fp32 [V, H] buffer."""
    require_backend(backend)
    seen = []
    real = core_linear.linear_token_pass

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(tuple(t.numel() for t in out[2:]))
        return out

    monkeypatch.setattr(core_linear, "linear_token_pass", spy)
    h, W, b, y = make_linear(2, 5, 16, 300)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    w = make_weights(y, "sequence")
    with torch.no_grad():
        loss = linear_weighted_nll(h, W, y, w, backend=backend)
    assert seen == [(0, 0, 0)], f"gradient buffers built under no_grad: {seen}"
    assert torch.equal(loss, linear_weighted_nll(h, W, y, w, backend=backend).detach())
    assert seen[1][:2] == (h.numel(), W.numel())


@pytest.mark.parametrize("fn", ["weighted_nll", "linear_weighted_nll"])
def test_weights_that_require_grad_are_an_error(fn):
    """No gradient flows into the weights; one that asks for it is an error naming .detach()."""
    B, T, V = 2, 3, 11
    labels = make_labels(B, T, V)
    logits = torch.randn(B, T, V, requires_grad=True)
    before = logits.detach().clone()
    w = torch.rand(B, requires_grad=True)
    with pytest.raises(ValueError, match=r"weights.*requires grad.*weights\.detach\(\)"):
        if fn == "weighted_nll":
            weighted_nll(logits, labels, w * 2, inplace=True)
        else:
            linear_weighted_nll(logits, torch.eye(V), labels, w * 2)
    assert torch.equal(logits.detach(), before) and logits.grad is None and w.grad is None
    weighted_nll(logits, labels, (w * 2).detach())  # what the message says works


# per-token weights through the logits form, per-sequence weights through the fused-linear form: both
# branches of token_coefficients are traced
@pytest.mark.parametrize("fn,form", [("weighted_nll", "token"), ("linear_weighted_nll", "sequence")])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compile_fullgraph_no_breaks_and_eager_parity(backend, fn, form, one_torch_thread):
    require_backend(backend)
    B, T, H, V = 3, 8, 16, 97
    torch.manual_seed(0)
    proj = torch.nn.Linear(H, H)
    head = torch.nn.Linear(H, V, bias=False)

    def f(x, labels, weights):
        h = torch.tanh(proj(x))
        if fn == "weighted_nll":
            return weighted_nll(head(h), labels, weights, shift_labels=True, backend=backend)
        return linear_weighted_nll(h, head.weight, labels, weights, shift_labels=True, chunk_size=5, backend=backend)

    x = torch.randn(B, T, H)
    labels = make_labels(B, T, V)
    weights = make_weights(labels, form)
    explained = torch._dynamo.explain(f)(x, labels, weights)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()

    def reference(proj, head):
        """f with the loss of varkernels.reference: plain PyTorch in fp32 (the yardstick), float64 (the truth)."""

        def g(x, labels, weights):
            x, weights = x.to(head.weight.dtype), weights.to(head.weight.dtype)
            h = torch.tanh(proj(x))
            if fn == "weighted_nll":
                return weighted_nll_reference(head(h), labels, weights, shift_labels=True)
            return linear_weighted_nll_reference(h, head.weight, labels, weights, shift_labels=True)

        return g, [*proj.parameters(), head.weight]

    def loss_and_grads(g, params):
        for p in params:
            p.grad = None
        loss = g(x, labels, weights)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    params = [*proj.parameters(), head.weight]
    eager = loss_and_grads(f, params)
    compiled = loss_and_grads(torch.compile(f, backend="aot_eager", fullgraph=True), params)
    ref = loss_and_grads(*reference(proj, head))
    truth = loss_and_grads(*reference(copy.deepcopy(proj).double(), copy.deepcopy(head).double()))
    token_floor = lp_atol(token_weights(weights, labels, dict(shift_labels=True)))
    for label, (loss, grads) in (("compiled", compiled), ("eager", eager)):
        assert_close(loss, ref[0], truth[0], name=f"{label} loss", atol_floor=token_floor)
        for name, a, r, t in zip(("proj.weight", "proj.bias", "head.weight"), grads, ref[1], truth[1]):
            assert_close(a, r, t, name=f"{label} grad of {name}")


def test_cpu_backend_loads_its_kernel_in_a_fresh_process():
    """backend="cpu" loads the C++ kernel itself: through the primitives and through the private core,
    in a process where nothing loaded it before."""
    require_backend("cpu")
    code = (
        "import torch\n"
        "from varkernels.core.autograd import token_forward\n"
        "from varkernels.core.token import TokenOptions\n"
        "x = torch.randn(2, 3, 11, requires_grad=True); y = torch.zeros(6, dtype=torch.long)\n"
        "v, _ = token_forward(x, y, torch.ones(6), TokenOptions('cpu'))\n"
        "v.backward()\n"
        "import varkernels\n"
        "print(float(varkernels.weighted_nll(x, y.view(2, 3), torch.ones(2), backend='cpu')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    float(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Bad input: the cases of the VAR losses (tests/test_validation.py) and those of the weights
# --------------------------------------------------------------------------------------------

_VAR_ONLY = ("rewards", "ref_logps", "mixed-forms", "beta", "weighting", "logp_reduction")
B, T, V = 3, 5, 50


def valid_call() -> dict:
    labels = make_labels(B, T, V)
    logits = make_logits(B, T, V, labels=torch.where(labels == IGNORE_INDEX, 0, labels))
    return dict(logits=logits, labels=labels, weights=make_weights(labels, "token"))


def call(fn: str, kw: dict):
    kw = dict(kw)
    x, labels, weights = kw.pop("logits"), kw.pop("labels"), kw.pop("weights")
    if fn == "weighted_nll":
        return weighted_nll(x, labels, weights, **kw)
    kw.pop("inplace", None)
    return linear_weighted_nll(x, torch.eye(V, dtype=torch.float32).requires_grad_(), labels, weights, **kw)


WEIGHT_CASES = [
    ("weights-shape-T", lambda kw: kw.update(weights=torch.ones(B, T + 1)), ValueError,
     r"weights.*\(3,\).*\(3, 5\).*\(3, 6\)"),
    ("weights-shape-B", lambda kw: kw.update(weights=torch.ones(B + 1)), ValueError, r"weights.*\(4,\)"),
    ("weights-3d", lambda kw: kw.update(weights=torch.ones(B, T, 1)), ValueError, r"weights.*\(3, 5, 1\)"),
    ("weights-int", lambda kw: kw.update(weights=torch.ones(B, dtype=torch.long)), TypeError, r"weights.*int64"),
    ("weights-list", lambda kw: kw.update(weights=[1.0] * B), TypeError, r"weights.*list"),
    ("weights-nan", lambda kw: kw["weights"].__setitem__((1, 2), float("nan")), ValueError, r"weights.*finite"),
    ("weights-inf", lambda kw: kw["weights"].__setitem__((0, 0), float("-inf")), ValueError, r"weights.*finite"),
    ("weights-device", lambda kw: kw.update(weights=torch.empty(B, device="meta")), ValueError,
     r"weights.*device.*cpu.*meta"),
    ("weights-requires-grad", lambda kw: kw.update(weights=torch.ones(B, requires_grad=True)), ValueError,
     r"weights.*detach"),
    ("reduction", lambda kw: kw.update(reduction="none"), ValueError, r"reduction.*'mean'.*'sum'.*'none'"),
]


# the VAR losses' cases, less those about rewards, ref_logps and the VAR options (not arguments here)
CASES = [c for c in BAD_INPUTS if not c[0].startswith(_VAR_ONLY)] + WEIGHT_CASES


@pytest.mark.parametrize("fn", ["weighted_nll", "linear_weighted_nll"])
@pytest.mark.parametrize("case,edit,exc,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, edit, exc, pattern, fn):
    kw = valid_call()
    # prepare_call validates before any backend runs (tests/test_validation.py::test_validation_runs_before_dispatch)
    kw["backend"] = "torch"
    if fn == "weighted_nll":
        kw["inplace"] = True
    edit(kw)
    before = snapshot(kw)
    if fn == "linear_weighted_nll":
        pattern = pattern.replace("logits", "hidden")
    with pytest.raises(exc, match=pattern):
        call(fn, kw)
    assert_untouched(kw, before)
