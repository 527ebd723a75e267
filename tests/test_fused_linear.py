"""fused_linear_var_loss and linear_sequence_logps against the reference (docs/design.md §1, §3 driver)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, require_backend

from varkernels import fused_linear_var_loss, linear_sequence_logps, linear_weighted_nll
from varkernels.reference import linear_sequence_logps_reference, linear_var_loss_reference

BACKENDS = ["triton", "torch", "cpu"]


def make(B, T, H, V, *, bias=True, pairs="matrix", reduction="mean", seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, : T // 3] = -100  # prompt
    if B > 2:
        y[B - 1] = -100  # an all-ignored row
    shape = (B, B) if pairs == "matrix" else (B,)
    R = torch.randn(*shape, generator=g)
    Q = -torch.rand(*shape, generator=g) * (3 if reduction == "mean" else 3 * T)
    return h, W, b, y, R, Q


def run_loss(fn, h, W, b, y, R, Q, dtype, upstream=1.0, **kw):
    ts = [t.detach().to(dtype).clone().requires_grad_() if t is not None else None for t in (h, W, b)]
    out = fn(ts[0], ts[1], y, R, Q, bias=ts[2], return_aux=True, **kw)
    (upstream * out.loss).backward()
    grads = [t.grad if t is not None else None for t in ts]
    return out, grads


CASES = [
    dict(),
    dict(chunk_size=1),
    dict(chunk_size=5),  # boundaries in the middle of sequences
    dict(shift_labels=True, chunk_size=4),
    dict(logp_reduction="sum", weighting="importance", chunk_size=3),
    dict(softcap=2.5, temperature=0.8),
    dict(pairs="vector"),
    dict(bias=False),
]


# bf16 changes the kernels' rounding, the weight-gradient GEMM and its accumulation over chunks, and the
# logit transforms: the cases that chunk or transform run in bf16 as well; the others (the VAR weights, the
# pair form, no bias) are the same computation in every dtype and run in fp32 only.
BF16_CASES = [CASES[i] for i in (0, 1, 2, 3, 5)]
PARITY_CASES = [(torch.float32, c) for c in CASES] + [(torch.bfloat16, c) for c in BF16_CASES]


def _case_id(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "default"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,case", PARITY_CASES, ids=[f"{str(d)[6:]}-{_case_id(c)}" for d, c in PARITY_CASES])
def test_fused_linear_parity(backend, dtype, case):
    require_backend(backend)
    case = dict(case)
    pairs, bias = case.pop("pairs", "matrix"), case.pop("bias", True)
    h, W, b, y, R, Q = make(3, 11, 33, 1001, bias=bias, pairs=pairs, reduction=case.get("logp_reduction", "mean"))
    ref_kw = {k: v for k, v in case.items() if k != "chunk_size"}
    # The gradient is computed in the forward, before the upstream scale is known: in bf16 it is
    # rounded once before the scale and once after (docs/design.md §2.5), where autograd rounds
    # once. So the upstream scale is exercised in fp32 here; bf16 runs with an upstream of 1.
    up = 3.0 if dtype == torch.float32 else 1.0
    truth, tg = run_loss(linear_var_loss_reference, h, W, b, y, R, Q, torch.float64, upstream=up, **ref_kw)
    same, sg = run_loss(linear_var_loss_reference, h, W, b, y, R, Q, dtype, upstream=up, **ref_kw)
    out, og = run_loss(fused_linear_var_loss, h, W, b, y, R, Q, dtype, upstream=up, backend=backend, **case)
    assert out.loss.dtype == torch.float32
    assert_close(out.loss, same.loss, truth.loss, name="loss")
    assert_close(out.policy_logps, same.policy_logps, truth.policy_logps, name="policy_logps")
    assert_close(out.weights, same.weights, truth.weights, name="weights")
    for name, o, t, s in zip(("grad_hidden", "grad_weight", "grad_bias"), og, tg, sg):
        if t is None:
            assert o is None
            continue
        assert o.dtype == dtype, f"{name} dtype {o.dtype}, expected {dtype}"
        assert_close(o, s, t, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_deterministic_and_hidden_untouched(backend):
    require_backend(backend)
    h, W, b, y, R, Q = make(2, 9, 16, 257)
    h, W, b = h.float(), W.float(), b.float()
    h0 = h.clone()
    runs = []
    for _ in range(2):
        hh, WW, bb = (t.clone().requires_grad_() for t in (h, W, b))
        loss = fused_linear_var_loss(hh, WW, y, R, Q, bias=bb, chunk_size=4, backend=backend)
        loss.backward()
        runs.append((loss, hh.grad, WW.grad, bb.grad))
    for a, c in zip(*runs):
        assert torch.equal(a, c)
    assert torch.equal(h, h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_noncontiguous_hidden(backend):
    require_backend(backend)
    h, W, b, y, R, Q = make(3, 8, 20, 301)
    h_t = h.float().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # [B,T,H] view, strided
    assert not h_t.is_contiguous()
    loss = fused_linear_var_loss(h_t, W.float(), y, R, Q, bias=b.float(), backend=backend)
    loss.backward()
    truth, (t_grad, _, _) = run_loss(linear_var_loss_reference, h, W, b, y, R, Q, torch.float64)
    same, (s_grad, _, _) = run_loss(linear_var_loss_reference, h, W, b, y, R, Q, torch.float32)
    assert_close(loss, same.loss, truth.loss, name="loss")
    assert_close(h_t.grad, s_grad, t_grad, name="grad_hidden")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_sequence_logps_parity(backend, reduction):
    require_backend(backend)
    h, W, b, y, R, Q = make(3, 10, 24, 517)
    kw = dict(reduction=reduction, shift_labels=True)

    def run(fn, dtype, **extra):
        ts = [t.detach().to(dtype).clone().requires_grad_() for t in (h, W, b)]
        out = fn(ts[0], ts[1], y, bias=ts[2], **kw, **extra)
        probe = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)  # a non-uniform upstream grad
        (out * probe).sum().backward()
        return out, [t.grad for t in ts]

    truth, tg = run(linear_sequence_logps_reference, torch.float64)
    same, sg = run(linear_sequence_logps_reference, torch.float32)
    out, og = run(linear_sequence_logps, torch.float32, backend=backend, chunk_size=7)
    assert out.dtype == torch.float32 and out.shape == truth.shape
    assert_close(out, same, truth, name="logps")
    for name, o, t, s in zip(("grad_hidden", "grad_weight", "grad_bias"), og, tg, sg):
        assert_close(o, s, t, name=name)


def test_linear_sequence_logps_no_grad_saves_nothing():
    h, W, b, y, R, Q = make(2, 6, 8, 50)
    h, W = h.float().requires_grad_(), W.float().requires_grad_()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = linear_sequence_logps(h, W, y, backend="torch")
        assert out.grad_fn is None and packed == []
        out = linear_sequence_logps(h, W, y, backend="torch")
        assert out.grad_fn is not None and len(packed) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dpo_on_linear_sequence_logps(backend):
    """DPO's sigmoid loss built on linear_sequence_logps matches a plain PyTorch DPO."""
    require_backend(backend)
    g = torch.Generator().manual_seed(1)
    B, T, H, V, beta = 4, 12, 16, 211, 0.1
    h = torch.randn(2 * B, T, H, generator=g, dtype=torch.float64)  # chosen rows, then rejected rows
    W = torch.randn(V, H, generator=g, dtype=torch.float64) / 4
    y = torch.randint(0, V, (2 * B, T), generator=g)
    y[:, :4] = -100
    ref_chosen = -torch.rand(B, generator=g, dtype=torch.float64) * 40
    ref_rejected = -torch.rand(B, generator=g, dtype=torch.float64) * 40

    def dpo(logps):
        chosen, rejected = logps[:B], logps[B:]
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        return -F.logsigmoid(margin).mean()

    def plain(dtype):
        """Plain PyTorch DPO on log_softmax in ``dtype``: float64 is the truth, float32 the yardstick."""
        hp, Wp = (t.detach().to(dtype).clone().requires_grad_() for t in (h, W))
        lp = torch.log_softmax(hp @ Wp.t(), -1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = dpo((lp * (y != -100)).sum(-1).double())
        loss.backward()
        return loss, hp.grad, Wp.grad

    truth, same = plain(torch.float64), plain(torch.float32)
    hk, Wk = h.float().requires_grad_(), W.float().requires_grad_()
    ours = dpo(linear_sequence_logps(hk, Wk, y, reduction="sum", backend=backend, chunk_size=9).double())
    ours.backward()
    for name, o, s, t in zip(("loss", "grad_hidden", "grad_weight"), (ours, hk.grad, Wk.grad), same, truth):
        assert_close(o, s, t, name=name)


def test_fused_linear_bad_inputs_name_the_argument():
    h, W, b, y, R, Q = make(2, 5, 8, 40)
    h, W, b = h.float(), W.float(), b.float()
    with pytest.raises(ValueError, match="hidden must have shape"):
        fused_linear_var_loss(h[..., :7], W, y, R, Q)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_var_loss(h, W, y, R, Q, bias=b[:5])
    with pytest.raises(TypeError, match="weight must be float32, bfloat16 or float16, got torch.float64"):
        fused_linear_var_loss(h, W.double(), y, R, Q)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_var_loss(h, W, y, R, Q, chunk_size=0)
    # the cases shared with the logits form (labels, rewards, options, ...): tests/test_validation.py


def _backend_settings() -> dict:
    """Every plain setting under torch.backends (flags of the mkldnn, cudnn, cuda, mkl, opt_einsum, ... modules
    and of their precision sub-objects such as ``mkldnn.matmul``), by dotted name."""
    import types

    import torch.backends as tb

    out = {}
    for name in dir(tb):
        mod = getattr(tb, name)
        if not isinstance(mod, types.ModuleType) or not mod.__name__.startswith("torch.backends."):
            continue
        names = set(dir(mod)) | set(dir(type(mod))) | set(dir(getattr(mod, "m", None) or mod))  # PropModule flags
        for attr in sorted(names):
            if attr.startswith("_") or attr == "m":
                continue
            try:
                v = getattr(mod, attr)
                if isinstance(v, (bool, int, float, str)) or v is None:
                    out[f"{name}.{attr}"] = v
                elif not callable(v) and hasattr(v, "fp32_precision"):
                    out[f"{name}.{attr}.fp32_precision"] = v.fp32_precision
            except Exception:  # a backend absent from this build (e.g. CUDA's on a CPU build)
                continue
    return out


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_fused_linear_leaves_torch_backends_as_they_were(backend):
    """Two threads running bf16 fused-linear losses change no process-wide setting (e.g. oneDNN's fp32 matmul
    precision), not even for the duration of a call: every torch.backends setting reads the same while they run."""
    require_backend(backend)
    import threading

    before = _backend_settings()
    assert "mkldnn.matmul.fp32_precision" in before or not hasattr(torch.backends.mkldnn, "matmul")
    seen, errors = [], []
    stop = threading.Event()

    def work(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            h = torch.randn(2, 40, 64, generator=g).bfloat16().requires_grad_()
            W = torch.randn(500, 64, generator=g).bfloat16().requires_grad_()
            y = torch.randint(0, 500, (2, 40), generator=g)
            for _ in range(3):
                linear_weighted_nll(h, W, y, torch.rand(2, generator=g), backend=backend, chunk_size=16).backward()
        except Exception as e:  # reported below: an exception in a thread would be lost
            errors.append(e)

    def watch():
        while not stop.is_set():
            seen.append(_backend_settings())

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not errors, errors
    assert _backend_settings() == before
    assert all(s == before for s in seen), [
        {k: v for k, v in s.items() if before.get(k) != v} for s in seen if s != before][:1]


def test_cpu_bf16_weight_grad_is_the_fp32_gemm():
    """Off the C++ backend's MKL GEMM, the bf16 weight-gradient GEMM runs on fp32 copies: they hold bf16 values
    exactly, so it equals the fp32 GEMM up to fp32 summation order (not one bf16 rounding per chunk)."""
    from varkernels.core.linear import _accumulate_weight_grad

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(300, 1000, generator=g).bfloat16()
    h_c = torch.randn(300, 256, generator=g).bfloat16()
    acc = torch.randn(1000, 256, generator=g)
    truth = acc.double() + grad.t().double() @ h_c.double()
    out = _accumulate_weight_grad(acc.clone(), grad, h_c, "torch")
    fp32 = acc.clone().addmm_(grad.t().float(), h_c.float())
    err, ref_err = (out.double() - truth).abs().max().item(), (fp32.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)  # fp32 sums, not one bf16 rounding (~1e-1 here)
