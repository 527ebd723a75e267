"""The VAR-agnostic core (varkernels/core/): registered operators, grad mode, k groups in one call,
torch.compile without graph breaks, and the CUDA code path on fake tensors.

docs/design.md §3 (architecture) and §2 (grad mode, compile, groups).
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, lp_atol, make_labels, make_pairs, require_backend

import varkernels
from varkernels.core import linear as core_linear
from varkernels.core.autograd import linear_token_forward, token_forward
from varkernels.core.token import TokenOptions
from varkernels.reference import (
    linear_sequence_logps_reference,
    linear_var_loss_reference,
    sequence_logps_reference,
    var_loss_reference,
)

IGNORE = -100


def _bits(t):
    return t.detach().clone()


def _spy_driver(monkeypatch, record):
    """Calls ``record(outputs)`` with the outputs of every run of the fused-linear driver."""
    real = core_linear.linear_token_pass

    def spy(*args, **kw):
        out = real(*args, **kw)
        record(out)
        return out

    monkeypatch.setattr(core_linear, "linear_token_pass", spy)


# --------------------------------------------------------------------------------------------
# registered operators
# --------------------------------------------------------------------------------------------


def test_operators_have_schemas_and_fake_kernels():
    """Every kernel is a PyTorch operator with a fake implementation: it runs on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from varkernels._backend import cpu_extension_available
    from varkernels._env import load_triton_ops

    load_triton_ops()  # the Triton operators are registered on first use
    names = ["token_triton", "token_torch", "linear_token_pass", "scale_triton", "var_weights_triton"]
    if cpu_extension_available():
        names.append("token_cpu")
    for name in names:
        op = getattr(torch.ops.varkernels, name).default
        assert op._schema.name == f"varkernels::{name}"
    with FakeTensorMode():
        x = torch.empty(2, 3, 11)
        labels = torch.zeros(6, dtype=torch.long)
        for name in [n for n in names if n.startswith("token_")]:
            lp, lse = getattr(torch.ops.varkernels, name)(x, labels, None, None, None, None, 1.0, IGNORE)
            assert lp.shape == lse.shape == (6,) and lp.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# a per-sequence weighted NLL other than VAR, built on the core in a few lines
# --------------------------------------------------------------------------------------------


def reward_weighted_nll(logits, labels, weights, *, backend):
    """loss = −Σ_i a_i·mean_t lp[i, t] with fixed per-sequence weights a (e.g. advantage-weighted SFT)."""
    n = (labels != IGNORE).sum(dim=1).clamp(min=1).float()
    coef = (-weights / n).unsqueeze(1).expand_as(labels).reshape(-1)
    loss, _ = token_forward(logits, labels.reshape(-1).contiguous(), coef, TokenOptions(backend))
    return loss


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_core_builds_another_weighted_nll(backend):
    require_backend(backend)
    B, T, V = 3, 7, 301
    labels = make_labels(B, T, V)
    x = torch.randn(B, T, V, dtype=torch.float64).float().requires_grad_()
    a = torch.tensor([0.5, -1.5, 2.0])
    loss = reward_weighted_nll(x, labels, a, backend=backend)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    truth = -(a.double() * sequence_logps_reference(x64, labels, reduction="mean")).sum()
    truth.backward()
    xr = x.detach().clone().requires_grad_()
    ref = -(a * sequence_logps_reference(xr, labels, reduction="mean")).sum()
    ref.backward()
    assert_close(loss, ref, truth, name="loss")
    assert_close(x.grad, xr.grad, x64.grad, name="grad")


# --------------------------------------------------------------------------------------------
# grad mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_no_grad_writes_nothing_and_gives_the_same_loss(backend, grad_off):
    require_backend(backend)
    B, T, V = 3, 6, 257
    labels = make_labels(B, T, V)
    rewards, ref_logps = make_pairs(labels)
    logits = torch.randn(B, T, V).requires_grad_()
    before = _bits(logits)
    with grad_off():
        loss = varkernels.fused_var_loss(logits, labels, rewards, ref_logps, inplace=True, backend=backend)
    assert torch.equal(logits.detach(), before), "inplace=True wrote into the logits under no_grad"
    assert logits.grad is None and not loss.requires_grad
    with_grad = varkernels.fused_var_loss(logits.detach().clone().requires_grad_(), labels, rewards, ref_logps,
                                          backend=backend)
    assert torch.equal(loss, with_grad.detach()), "no_grad changed the loss value"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_no_grad_builds_no_weight_gradient(monkeypatch, backend):
    """Under no_grad the fused-linear driver is asked for no gradient: no fp32 [V, H] accumulator."""
    require_backend(backend)
    seen = []
    _spy_driver(monkeypatch, lambda out: seen.append(tuple(t.numel() for t in out[2:])))
    B, T, H, V = 2, 5, 16, 300
    labels = make_labels(B, T, V)
    rewards, ref_logps = make_pairs(labels)
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    with torch.no_grad():
        loss = varkernels.fused_linear_var_loss(hidden, weight, labels, rewards, ref_logps, backend=backend)
    assert seen == [(0, 0, 0)], f"gradient buffers built under no_grad: {seen}"
    loss_grad = varkernels.fused_linear_var_loss(hidden, weight, labels, rewards, ref_logps, backend=backend)
    assert seen[1][1] == V * H
    assert torch.equal(loss, loss_grad.detach())


# --------------------------------------------------------------------------------------------
# k groups in one call
# --------------------------------------------------------------------------------------------


def _groups(k, B, T, V, cross):
    labels = make_labels(k * B, T, V)
    Rs, Qs = zip(*(make_pairs(labels[g * B : (g + 1) * B], form="matrix" if cross else "vector") for g in range(k)))
    return labels, torch.stack(Rs), torch.stack(Qs)


@pytest.mark.parametrize("cross", [True, False], ids=["cross_pairs", "shared_context"])
@pytest.mark.parametrize("backend", ["triton", "cpu", "torch"])
def test_k_groups_equal_the_mean_of_group_losses(backend, cross):
    require_backend(backend)
    k, B, T, V = 3, 2, 5, 129
    labels, R, Q = _groups(k, B, T, V, cross)
    x = torch.randn(k * B, T, V, requires_grad=True)
    out = varkernels.fused_var_loss(x, labels, R, Q, backend=backend, return_aux=True)
    out.loss.backward()
    x64 = x.detach().double().requires_grad_()
    parts = [var_loss_reference(x64[g * B : (g + 1) * B], labels[g * B : (g + 1) * B], R[g].double(),
                                Q[g].double(), return_aux=True) for g in range(k)]
    truth = torch.stack([p.loss for p in parts]).mean()
    truth.backward()
    xr = x.detach().clone().requires_grad_()
    ref = var_loss_reference(xr, labels, R, Q, return_aux=True)
    ref.loss.backward()
    assert_close(out.loss, ref.loss, truth, name="loss")
    assert_close(x.grad, xr.grad, x64.grad, name="grad")
    for field in ("weights", "log_z", "policy_logps"):
        t = torch.cat([getattr(p, field) for p in parts])
        assert_close(getattr(out, field), getattr(ref, field), t, name=field)
    assert_close(out.ess, ref.ess, torch.stack([p.ess for p in parts]).mean(), name="ess")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_k_groups_fused_linear(backend):
    require_backend(backend)
    k, B, T, H, V = 3, 2, 6, 16, 211
    labels, R, Q = _groups(k, B, T, V, True)
    hidden = torch.randn(k * B, T, H, requires_grad=True)
    weight = (torch.randn(V, H) / 4).requires_grad_()
    loss = varkernels.fused_linear_var_loss(hidden, weight, labels, R, Q, backend=backend, chunk_size=5)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    truth = torch.stack([
        linear_var_loss_reference(h64[g * B : (g + 1) * B], w64, labels[g * B : (g + 1) * B], R[g].double(),
                                  Q[g].double()) for g in range(k)
    ]).mean()
    truth.backward()
    hr, wr = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = linear_var_loss_reference(hr, wr, labels, R, Q)
    ref.backward()
    assert_close(loss, ref, truth, name="loss")
    assert_close(hidden.grad, hr.grad, h64.grad, name="grad_hidden")
    assert_close(weight.grad, wr.grad, w64.grad, name="grad_weight")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_k_group_call_holds_one_weight_accumulator(backend, monkeypatch):
    """3 groups in one call peak within 1.3x of one group beyond inputs and gradients: one fp32
    [V, H] accumulator (32 MiB here, the dominant term), not one per group as k calls would hold.
    (The chunked pass: the deferred one, which these few rows would take, holds no accumulator, below.)"""
    require_backend(backend)
    import sys

    import varkernels.core.linear_cpu as linear_cpu

    monkeypatch.setattr(linear_cpu, "forward_pass_applies", lambda *a: False)

    from tools.memory import fix_mmap_threshold, peak_rss_bytes

    if not sys.platform.startswith("linux") or not fix_mmap_threshold():
        pytest.skip("peak memory is read from Linux's VmHWM with glibc's mmap threshold pinned")
    B, T, H, V = 2, 8, 256, 32768
    weight = (torch.randn(V, H) / 16).to(torch.bfloat16).requires_grad_()
    peaks = {}
    for k in (1, 3, 1):  # the 1-group call twice: the first one also pays one-time set-up
        labels, R, Q = _groups(k, B, T, V, True)
        hidden = torch.randn(k * B, T, H).to(torch.bfloat16).requires_grad_()
        weight.grad = None

        def run():
            varkernels.fused_linear_var_loss(hidden, weight, labels, R, Q, backend=backend, chunk_size=16).backward()

        peak = peak_rss_bytes(run)
        grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
        peaks[k] = peak - grads
    acc = V * H * 4
    assert peaks[1] >= 0.9 * acc, f"the 1-group peak {peaks[1]:,} B misses the fp32 accumulator ({acc:,} B)"
    assert peaks[3] <= 1.3 * peaks[1], f"3 groups peak at {peaks[3]:,} B beyond grads vs {peaks[1]:,} B for one"


def test_deferred_weight_grad_holds_no_fp32_accumulator():
    """bf16 with the C++ backend and n ≤ H target rows (so nothing beside the storage): the weight gradient is
    finished in its own storage, so the peak beyond inputs and gradients stays far below the fp32 [V, H]
    accumulator (32 MiB here) that the chunked pass holds (docs/design.md §3.3)."""
    backend = "cpu"
    require_backend(backend)
    import sys

    import varkernels.core.linear_cpu as linear_cpu

    if not linear_cpu.f32_gemm_available():
        pytest.skip("the deferred weight gradient needs the C++ extension's gemm_f32 (MKL)")

    from tools.memory import fix_mmap_threshold, peak_rss_bytes

    if not sys.platform.startswith("linux") or not fix_mmap_threshold():
        pytest.skip("peak memory is read from Linux's VmHWM with glibc's mmap threshold pinned")
    B, T, H, V = 2, 8, 256, 32768
    weight = (torch.randn(V, H) / 16).to(torch.bfloat16).requires_grad_()
    labels, R, Q = _groups(1, B, T, V, True)
    hidden = torch.randn(B, T, H).to(torch.bfloat16).requires_grad_()
    assert int((labels != -100).sum()) <= H
    peaks = []
    for _ in range(2):  # the first call also pays one-time set-up
        weight.grad = hidden.grad = None

        def run():
            loss = varkernels.fused_linear_var_loss(hidden, weight, labels, R[0], Q[0], backend=backend, chunk_size=16)
            loss.backward()

        peaks.append(peak_rss_bytes(run) - sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight)))
    acc = V * H * 4
    assert peaks[-1] <= 0.3 * acc, f"peak {peaks[-1]:,} B beyond gradients vs the fp32 accumulator's {acc:,} B"


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _step(model, form, backend):
    def f(ids, labels, R, Q):
        if form == "linear":
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            return varkernels.fused_linear_var_loss(h, model.lm_head.weight, labels, R, Q, shift_labels=True,
                                                    backend=backend)
        logits = model(input_ids=ids, use_cache=False).logits
        if form == "logits":
            return varkernels.fused_var_loss(logits, labels, R, Q, shift_labels=True, backend=backend)
        return -varkernels.sequence_logps(logits, labels, shift_labels=True, backend=backend).mean()

    return f


def _batch(B, T):
    ids = torch.randint(0, 256, (B, T))
    labels = ids.clone()
    labels[:, : T // 3] = IGNORE
    R, Q = make_pairs(labels)
    return ids, labels, R, Q


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _reference_step(model, form):
    """``_step`` with the losses of varkernels.reference: plain PyTorch in the model's dtype (the yardstick of
    docs/design.md §4.1 in fp32, the ground truth on a float64 copy of the model)."""

    def f(ids, labels, R, Q):
        R, Q = R.to(model.dtype), Q.to(model.dtype)
        if form == "linear":
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            return linear_var_loss_reference(h, model.lm_head.weight, labels, R, Q, shift_labels=True)
        logits = model(input_ids=ids, use_cache=False).logits
        if form == "logits":
            return var_loss_reference(logits, labels, R, Q, shift_labels=True)
        return -sequence_logps_reference(logits, labels, shift_labels=True).mean()

    return f


def _loss_and_grads(model, f, batch):
    model.zero_grad()
    loss = f(*batch)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_compiled_matches_eager(model, f, compiled, batch, form):
    """Loss and parameter gradients of ``compiled(*batch)``, and of eager ``f(*batch)``, within the tolerance
    policy (helpers.assert_close): the same step in plain PyTorch fp32 is the yardstick, in float64 the truth."""
    eager = _loss_and_grads(model, f, batch)
    got = _loss_and_grads(model, compiled, batch)
    ref = _loss_and_grads(model, _reference_step(model, form), batch)
    model64 = copy.deepcopy(model).double()
    truth = _loss_and_grads(model64, _reference_step(model64, form), batch)
    names = [n for n, _ in model.named_parameters()]
    for label, (loss, grads) in (("compiled", got), ("eager", eager)):
        assert_close(loss, ref[0], truth[0], name=f"{label} loss")
        for n, g, r, t in zip(names, grads, ref[1], truth[1]):
            assert_close(g, r, t, name=f"{label} grad of {n}")


@pytest.mark.parametrize("form", ["logits", "linear", "logps"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compile_fullgraph_no_breaks_and_eager_parity(backend, form, one_torch_thread):
    require_backend(backend)
    pytest.importorskip("transformers")
    model = _tiny_llama()
    f = _step(model, form, backend)
    batch = _batch(4, 12)
    explained = torch._dynamo.explain(f)(*batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    _assert_compiled_matches_eager(model, f, torch.compile(f, backend="aot_eager", fullgraph=True), batch, form)


@pytest.mark.parametrize("form", ["logits", "linear"])
def test_compile_dynamic_over_two_lengths(form, one_torch_thread):
    pytest.importorskip("transformers")
    backend = "cpu"
    require_backend(backend)
    model = _tiny_llama()
    f = _step(model, form, backend)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (10, 14):
        _assert_compiled_matches_eager(model, f, compiled, _batch(4, T), form)


# --------------------------------------------------------------------------------------------
# the CUDA code path on fake tensors
# --------------------------------------------------------------------------------------------


def test_cuda_path_runs_on_fake_tensors():
    """With fake CUDA bf16 tensors the computation of each loss and its gradients runs and every op
    it issues is recorded. Inputs do not require grad (autograd on fake CUDA tensors aborts the CPU
    build of torch), so the forward-mode functions are driven directly: gradients are computed in
    their forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []
            self.gemms = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                mats = [a for a in args if isinstance(a, torch.Tensor)][-2:]
                self.gemms.append(tuple(m.dtype for m in mats))
            return func(*args, **(kwargs or {}))

    from tools.costmodel import fake_cuda_shim  # slicing and out= of fake CUDA tensors

    B, T, H, V = 2, 64, 128, 1024
    with FakeTensorMode(allow_non_fake_inputs=False), fake_cuda_shim(), Record() as rec:
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(B, T, V, **bf16)
        labels = torch.zeros(B, T, dtype=torch.long, device="cuda")
        R = torch.empty(B, B, device="cuda")
        Q = torch.empty(B, B, device="cuda")
        out = varkernels.fused_var_loss(logits, labels, R, Q, backend="triton", return_aux=True)
        assert out.loss.device.type == "cuda" and out.weights.shape == (B,)
        hidden = torch.empty(B, T, H, **bf16)
        weight = torch.empty(V, H, **bf16)
        coef = torch.empty(B * T, device="cuda")
        lp, lse, gh, gw, gb = core_linear.linear_token_pass(
            hidden, weight, None, labels.view(-1), coef, None, (True, True, False),
            TokenOptions("triton", chunk_size=32),
        )
        assert gh.shape == hidden.shape and gh.dtype == torch.bfloat16
        assert gw.shape == (V, H) and gw.dtype == torch.float32
        loss, lp2 = linear_token_forward(hidden, weight, None, labels.view(-1), coef,
                                         TokenOptions("triton", chunk_size=32))
        _, lp3 = token_forward(logits, labels.view(-1), None, TokenOptions("triton"))
        assert lp3.shape == (B * T,)
    ops = set(rec.ops)
    assert "varkernels.token_triton.default" in ops and "varkernels.var_weights_triton.default" in ops
    # the three GEMMs of the fused-linear driver, none on fp32 copies of bf16 operands
    assert len(rec.gemms) >= 3 and all(d == (torch.bfloat16, torch.bfloat16) for d in rec.gemms), rec.gemms


def test_sequence_logps_reference_agrees():
    """Keep the generic log-prob mode honest on the core (a quick smoke, the full matrix is in test_logps.py)."""
    B, T, H, V = 2, 5, 8, 50
    labels = make_labels(B, T, V)
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H)
    for backend in ("cpu", "torch"):
        require_backend(backend)
        got = varkernels.linear_sequence_logps(hidden, weight, labels, reduction="sum", backend=backend)
        want = linear_sequence_logps_reference(hidden, weight, labels, reduction="sum")
        truth = linear_sequence_logps_reference(hidden.double(), weight.double(), labels, reduction="sum")
        tokens = (labels != IGNORE).sum(1).max().double()  # a sum of up to this many token log-probs per row
        assert_close(got, want, truth, name=f"sequence logps ({backend})", atol_floor=lp_atol(tokens))


def test_varloss_module_checks_options_at_construction():
    with pytest.raises(TypeError, match=r"unknown options \['betta'\]"):
        varkernels.VARLoss(betta=1.0)
    with pytest.raises(ValueError, match="beta"):
        varkernels.VARLoss(beta=-1.0)
    with pytest.raises(ValueError, match="weighting"):
        varkernels.VARLoss(weighting="prior")
    assert "beta=0.5" in repr(varkernels.VARLoss(beta=0.5))


def test_fused_linear_takes_no_inplace_keyword():
    """The logits chunks of the fused-linear loss are always overwritten: no keyword accepted and ignored."""
    B, T, H, V = 2, 3, 4, 11
    labels = make_labels(B, T, V)
    R, Q = make_pairs(labels)
    with pytest.raises(TypeError, match="inplace"):
        varkernels.fused_linear_var_loss(torch.randn(B, T, H), torch.randn(V, H), labels, R, Q, inplace=True)


def test_public_names_exported():
    for name in varkernels.__all__:
        assert getattr(varkernels, name) is not None, name


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_weight_grad_accumulated_in_the_parameter_dtype(monkeypatch, backend):
    """grad_accum_dtype=weight.dtype: a bf16 [V, H] accumulator (V·H·2 bytes less), one bf16 rounding
    per chunk. Its error is bounded by PyTorch's own plus one bf16 half-ulp of the largest gradient per
    chunk; the fp32 default stays within the tolerance policy (test_fused_linear.py). Measured here
    (docs/design.md §2.5): 2.5x PyTorch's error with 32 chunks, 1.05x with 8."""
    require_backend(backend)
    seen = []
    _spy_driver(monkeypatch, lambda out: seen.append(out[3].dtype))
    B, T, H, V, chunk = 4, 64, 32, 500, 16
    labels = make_labels(B, T, V)
    R, Q = make_pairs(labels)
    hidden = torch.randn(B, T, H).bfloat16()
    weight = (torch.randn(V, H) / 8).bfloat16()
    w = weight.clone().requires_grad_()
    varkernels.fused_linear_var_loss(hidden, w, labels, R, Q, chunk_size=chunk, grad_accum_dtype=torch.bfloat16,
                                     backend=backend).backward()
    assert seen == [torch.bfloat16] and w.grad.dtype == torch.bfloat16
    w64 = weight.double().requires_grad_()
    linear_var_loss_reference(hidden.double(), w64, labels, R.double(), Q.double()).backward()
    wr = weight.clone().requires_grad_()
    linear_var_loss_reference(hidden, wr, labels, R, Q).backward()
    n_chunks = -(-int((labels != IGNORE).sum()) // chunk)
    scale = float(w64.grad.abs().max())
    err = float((w.grad.double() - w64.grad).abs().max())
    ref_err = float((wr.grad.double() - w64.grad).abs().max())
    assert err <= ref_err + n_chunks * 2.0**-9 * scale, (err, ref_err, n_chunks)
    with pytest.raises(ValueError, match="grad_accum_dtype"):
        varkernels.fused_linear_var_loss(hidden, w, labels, R, Q, grad_accum_dtype=torch.float16)
