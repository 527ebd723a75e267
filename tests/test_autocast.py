"""The fused-linear form under ``torch.autocast`` and with mixed hidden / weight dtypes.

Under autocast the GEMMs run in the autocast dtype, as the model's own ``lm_head`` matmul would
(``varkernels.core.autograd.head_dtype``); accumulation stays fp32 and every gradient comes back in its leaf's
dtype. Checked, under the tolerance policy (tests/helpers.py), against:

* truth: float64 on the operands cast to the autocast dtype (what the computation actually multiplies);
* PyTorch: the same loss with ``F.linear`` under the same autocast (the model's head), the yardstick.

The backward-mode path (``linear_sequence_logps``) recomputes its logits in the backward: it must multiply the
same cast operands as its forward, so two inputs that round to the same bf16 values give the same gradient.
Ported cases: Liger-Kernel's ``test_amp`` shapes for its fused linear cross-entropy, and TRL's chunked log-prob
head tests ``test_backward_uses_autocast_hidden_for_weight_gradient`` and
``test_backward_bfloat16_hidden_float32_weight``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, lp_atol, require_backend

import varkernels
from varkernels.reference import linear_sequence_logps_reference, linear_weighted_nll_reference

BACKENDS = ["cpu", "torch", "triton"]
AMP_DTYPES = [torch.bfloat16, torch.float16]


def _inputs(B, T, H, V, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * H**-0.5
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, : T // 4] = -100
    w = torch.rand(B, generator=g) + 0.5
    return h, W, b, y, w


def _leaves(*ts):
    return [None if t is None else t.clone().requires_grad_() for t in ts]


def _grads(loss, leaves):
    loss.backward()
    return [t.grad for t in leaves if t is not None]


def _run_cases(backend, dtype, B, T, H, V, bias):
    """(kernel, PyTorch, truth) of (loss, grads of hidden, weight[, bias]) for linear_weighted_nll."""
    h, W, b, y, w = _inputs(B, T, H, V, bias)
    leaves = _leaves(h, W, b)
    with torch.autocast("cpu", dtype=dtype):
        loss = varkernels.linear_weighted_nll(leaves[0], leaves[1], y, w, bias=leaves[2], backend=backend)
    kernel = (loss, *_grads(loss, leaves))
    ref_leaves = _leaves(h, W, b)
    with torch.autocast("cpu", dtype=dtype):
        ref_loss = linear_weighted_nll_reference(ref_leaves[0], ref_leaves[1], y, w, bias=ref_leaves[2])
    pytorch = (ref_loss, *_grads(ref_loss, ref_leaves))
    cast = [None if t is None else t.to(dtype).double() for t in (h, W, b)]  # what the GEMMs multiply
    truth_leaves = _leaves(*cast)
    truth_loss = linear_weighted_nll_reference(truth_leaves[0], truth_leaves[1], y, w, bias=truth_leaves[2])
    truth = (truth_loss, *_grads(truth_loss, truth_leaves))
    return kernel, pytorch, truth, y, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", AMP_DTYPES)
@pytest.mark.parametrize("B,T,H,V,bias", [
    (4, 47, 31, 123, False),  # Liger's odd shape
    (4, 47, 31, 123, True),
    pytest.param(8, 128, 1024, 4096, False, marks=pytest.mark.slow),  # Liger's test_amp shape
    pytest.param(8, 128, 1024, 4096, True, marks=pytest.mark.slow),
])
def test_weighted_nll_under_autocast(backend, dtype, B, T, H, V, bias):
    """fp32 leaves, the loss called under autocast: values and gradients as PyTorch's autocast computation (or
    closer to the float64 truth), every gradient fp32 like its leaf."""
    require_backend(backend)
    kernel, pytorch, truth, y, w = _run_cases(backend, dtype, B, T, H, V, bias)
    assert kernel[0].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in kernel[1:])  # fp32 leaves get fp32 gradients
    n = (y != -100).sum(1, keepdim=True).clamp(min=1)
    token_w = (w.unsqueeze(1) / n / B).expand(B, T)[y != -100]
    assert_close(kernel[0], pytorch[0], truth[0], name="loss", atol_floor=lp_atol(token_w))
    for name, k, p, t in zip(("grad hidden", "grad weight", "grad bias"), kernel[1:], pytorch[1:], truth[1:]):
        assert_close(k, p, t, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", AMP_DTYPES)
def test_var_loss_under_autocast_matches_explicitly_cast_inputs(backend, dtype):
    """fused_linear_var_loss under autocast computes what it computes on inputs cast by hand (the same products;
    gradients then cast back to the fp32 leaves), not a crash (the issue's snippet)."""
    require_backend(backend)
    h, W, b, y, _ = _inputs(2, 8, 16, 32, bias=True)
    R, Q = torch.randn(2), -torch.rand(2)
    leaves = _leaves(h, W, b)
    with torch.autocast("cpu", dtype=dtype):
        loss = varkernels.fused_linear_var_loss(leaves[0], leaves[1], y, R, Q, bias=leaves[2], backend=backend)
    got = (loss, *_grads(loss, leaves))
    cast = _leaves(h.to(dtype), W.to(dtype), b.to(dtype))
    want_loss = varkernels.fused_linear_var_loss(cast[0], cast[1], y, R, Q, bias=cast[2], backend=backend)
    want = (want_loss, *_grads(want_loss, cast))
    assert torch.equal(got[0], want[0])
    for g, t, ww in zip(got[1:], (h, W, b), want[1:]):
        assert g.dtype == t.dtype
        # the same bf16/fp16 logits gradient; the explicit-cast run rounds grad_weight to the half dtype once,
        # the fp32 leaf keeps the fp32 accumulator: equal after that one rounding
        assert torch.equal(g.to(dtype), ww)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["linear_sequence_logps", "linear_weighted_nll"])
def test_same_bf16_inputs_give_the_same_gradient(backend, fn):
    """Two fp32 hidden states that round to the same bf16 values are the same input to a bf16 head: the loss and
    every gradient must be bitwise equal, in the backward-mode path (logits recomputed in backward) too."""
    require_backend(backend)
    h, W, _, y, w = _inputs(2, 16, 32, 128, bias=False)
    h1 = h.bfloat16().float()
    h2 = h1 + h1.abs() * 2.0**-12  # below half a bf16 ulp: rounds back to h1's bf16 values
    assert torch.equal(h2.bfloat16(), h1.bfloat16()) and not torch.equal(h1, h2)
    outs = []
    for hh in (h1, h2):
        leaves = _leaves(hh, W)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fn == "linear_sequence_logps":
                loss = (varkernels.linear_sequence_logps(leaves[0], leaves[1], y, backend=backend) * w).sum()
            else:
                loss = varkernels.linear_weighted_nll(leaves[0], leaves[1], y, w, backend=backend)
        outs.append((loss.detach(), *_grads(loss, leaves)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_uses_the_autocast_hidden_for_the_weight_gradient(backend):
    """TRL's test_backward_uses_autocast_hidden_for_weight_gradient, ported: under CPU bf16 autocast the weight
    gradient of Σ log-probs is the gradient of the bf16 computation (float64 truth on the bf16-cast operands),
    within the policy of PyTorch's own autocast computation; a backward that recomputed the logits in fp32 was
    2.7e-2 off (relative) where PyTorch's autocast is at 2.6e-3."""
    require_backend(backend)
    torch.manual_seed(0)
    N, H, V = 64, 32, 128
    hidden = torch.linspace(1, 2, N * H).view(1, N, H).bfloat16().float()
    W = torch.randn(V, H)
    y = torch.randint(0, V, (1, N))
    leaves = _leaves(hidden, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = varkernels.linear_sequence_logps(leaves[0], leaves[1], y, reduction="sum", backend=backend)
    _grads(lp.sum(), leaves)
    ref_leaves = _leaves(hidden, W)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_sequence_logps_reference(ref_leaves[0], ref_leaves[1], y, reduction="sum")
    _grads(ref.sum(), ref_leaves)
    truth_leaves = _leaves(hidden.bfloat16().double(), W.bfloat16().double())
    _grads(linear_sequence_logps_reference(truth_leaves[0], truth_leaves[1], y, reduction="sum").sum(), truth_leaves)
    assert leaves[1].grad.dtype == torch.float32
    assert_close(leaves[1].grad, ref_leaves[1].grad, truth_leaves[1].grad, name="grad weight")
    assert_close(leaves[0].grad, ref_leaves[0].grad, truth_leaves[0].grad, name="grad hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
def test_mixed_hidden_and_weight_dtypes(backend, hidden_dtype, weight_dtype):
    """TRL's test_backward_bfloat16_hidden_float32_weight, and the reverse: without autocast the GEMMs run in the
    higher precision (fp32, the promoted dtype), the gradients come back in each tensor's own dtype."""
    require_backend(backend)
    h, W, _, y, w = _inputs(2, 12, 32, 96, bias=False)
    h, W = h.to(hidden_dtype), W.to(weight_dtype)
    for fn in (lambda hh, WW: varkernels.linear_weighted_nll(hh, WW, y, w, backend=backend),
               lambda hh, WW: (varkernels.linear_sequence_logps(hh, WW, y, backend=backend) * w).sum()):
        leaves = _leaves(h, W)
        loss = fn(*leaves)
        loss.backward()
        assert leaves[0].grad.dtype == hidden_dtype and leaves[1].grad.dtype == weight_dtype
        ref_leaves = _leaves(h.float(), W.float())  # the same computation on explicitly promoted operands
        ref = fn(*ref_leaves)
        ref.backward()
        assert torch.equal(loss, ref)
        assert torch.equal(leaves[0].grad, ref_leaves[0].grad.to(hidden_dtype))
        assert torch.equal(leaves[1].grad, ref_leaves[1].grad.to(weight_dtype))


def test_autocast_under_torch_compile():
    """The autocast dtype is read at trace time: a compiled call matches eager, gradients fp32."""
    h, W, _, y, w = _inputs(2, 8, 16, 64, bias=False)

    def f(hh, WW):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return varkernels.linear_weighted_nll(hh, WW, y, w, backend="torch")

    eager = _leaves(h, W)
    e = f(*eager)
    _grads(e, eager)
    compiled = _leaves(h, W)
    c = torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled)
    _grads(c, compiled)
    assert torch.equal(e, c)
    for a, b in zip(eager, compiled):
        assert b.grad.dtype == torch.float32 and torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("fn", ["fused_var_loss", "weighted_nll", "sequence_logps"])
def test_logits_form_under_autocast(fn):
    """The logits form has no GEMM of its own: under autocast it takes the model's (bf16) logits as they are."""
    h, W, _, y, w = _inputs(2, 8, 16, 64, bias=False)
    Wl = W.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = F.linear(h, Wl)
        assert logits.dtype == torch.bfloat16
        if fn == "fused_var_loss":
            loss = varkernels.fused_var_loss(logits, y, torch.randn(2), -torch.rand(2))
        elif fn == "weighted_nll":
            loss = varkernels.weighted_nll(logits, y, w)
        else:
            loss = varkernels.sequence_logps(logits, y).sum()
    loss.backward()
    assert loss.dtype == torch.float32 and Wl.grad.dtype == torch.float32 and torch.isfinite(Wl.grad).all()
