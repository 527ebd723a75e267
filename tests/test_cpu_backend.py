"""The C++ CPU backend (csrc/, ``backend="cpu"``) against float64 ground truth (docs/design.md §4.1).

Two levels:
  * ``token_op`` on backend "cpu" vs backend "torch" (the chunked PyTorch path) vs a float64
    version of the same maths (``token_truth``): lp, lse and the gradient rows, for every option
    of the op (softcap, temperature, lse_in, no gradient, in place, strides, label dtypes), on
    each instruction set the machine supports (AVX512 / AVX2 / baseline kernels).
  * ``fused_var_loss(backend="cpu")`` vs ``var_loss_reference`` (loss, diagnostics, logits
    gradient), with the tolerance policy of ``helpers.assert_close``:
        max |kernel − truth| <= 2 · max |PyTorch in the same dtype − truth| + 1e-6 · max |truth|.
Plus the behaviours that are not a tolerance: errors, determinism, the loader's fallback.
The whole module is skipped (with the reason) when the extension cannot be built here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import IGNORE_INDEX, assert_close, make_labels, make_logits, make_pairs, reference_run

from varkernels import csrc_loader, fused_var_loss, sequence_logps
from varkernels.core.token import token_kernel
from varkernels.reference import sequence_logps_reference


def token_op(backend, x, labels, coef=None, grad=None, lse_in=None, *, temperature=1.0, **opts):
    """The core token op with the public ``temperature`` keyword (the op takes 1/τ) and the public defaults of
    softcap and ignore_index (the operators' schemas have none)."""
    opts = {"softcap": None, "ignore_index": IGNORE_INDEX, **opts}
    return token_kernel(backend)(x, labels, coef, grad, lse_in, inv_temperature=1.0 / temperature, **opts)


EXT = csrc_loader.load_extension(required=False)
if EXT is None:
    pytest.skip(f"C++ CPU extension unavailable: {csrc_loader._state.get('error')}", allow_module_level=True)

# The kernels of every instruction set this CPU can run: ATen's capability and the ones below it.
ISAS = ("AVX512", "AVX2", "DEFAULT")
CAPABILITIES = list(ISAS[ISAS.index(EXT.capability()):])


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    EXT.set_capability(request.param)
    yield request.param
    EXT.set_capability("")


# --------------------------------------------------------------------------------------------
# token_op: float64 truth of the op's contract (ops/token.py)
# --------------------------------------------------------------------------------------------


def token_truth(x, labels, coef, *, softcap=None, temperature=1.0, ignore_index=IGNORE_INDEX, lse_in=None):
    """(lp [N], lse [N], grad [B,T,V]) in float64: the token op written out, nothing chunked."""
    B, T, V = x.shape
    z = x.double().reshape(B * T, V)
    dz = torch.full_like(z, 1.0 / temperature)
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = softcap * t
        dz = (1 - t * t) / temperature
    z = z / temperature
    y = labels.long()
    valid = y != ignore_index
    ys = torch.where(valid, y, 0)
    lse = torch.logsumexp(z, dim=1) if lse_in is None else lse_in.double()
    lp = z.gather(1, ys[:, None])[:, 0] - lse
    grad = None
    if coef is not None:
        p = torch.exp(z - lse[:, None])
        p[torch.arange(B * T), ys] -= 1.0
        grad = (coef.double()[:, None] * p * dz * valid[:, None]).reshape(B, T, V)
    zero = torch.zeros_like(lse)
    return torch.where(valid, lp, zero), torch.where(valid, lse, zero), grad


def run_token(backend, x, labels, coef, grad_dtype, *, inplace=False, lse_in=None, grad_strided=False, **opts):
    """token_op on a copy of x; returns (lp, lse, grad or None)."""
    x = x.clone()
    grad = None
    if coef is not None:
        if inplace:
            grad = x
        elif grad_strided:  # a [B, T, V] view with a T-major layout and stride 2 along V
            grad = torch.zeros(x.shape[1], x.shape[0], 2 * x.shape[2], dtype=grad_dtype)[..., ::2].transpose(0, 1)
        else:
            grad = torch.empty(x.shape, dtype=grad_dtype)
    lp, lse = token_op(backend, x, labels, coef, grad, lse_in, **opts)
    return lp, lse, grad


def check_token(x, labels, coef=None, *, grad_dtype=None, inplace=False, lse_in=None, grad_strided=False, **opts):
    grad_dtype = grad_dtype or x.dtype
    kw = dict(inplace=inplace, lse_in=lse_in, grad_strided=grad_strided, **opts)
    lp, lse, g = run_token("cpu", x, labels, coef, grad_dtype, **kw)
    lp_t, lse_t, g_t = run_token("torch", x, labels, coef, grad_dtype, **kw)
    lp64, lse64, g64 = token_truth(x, labels, coef, lse_in=lse_in, **opts)
    assert lp.dtype == lse.dtype == torch.float32 and lp.shape == lse.shape == (labels.numel(),)
    assert_close(lp, lp_t, lp64, name="lp")
    assert_close(lse, lse_t, lse64, name="lse")
    if coef is not None:
        assert g.dtype == grad_dtype
        assert_close(g, g_t, g64, name="grad")
    ignored = labels == IGNORE_INDEX
    assert bool((lp[ignored] == 0).all()) and bool((lse[ignored] == 0).all())
    if coef is not None:
        assert bool((g.reshape(-1, x.shape[-1])[ignored] == 0).all()), "ignored rows must get a zero gradient"


def token_inputs(B, T, V, dtype, *, ignored_rows=(), label_dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = make_labels(B, T, V, ignored_rows=ignored_rows, dtype=label_dtype, generator=gen)
    x = make_logits(B, T, V, dtype, labels=torch.where(labels == IGNORE_INDEX, 0, labels),
                    requires_grad=False, generator=gen)
    coef = torch.randn(B * T, generator=gen)
    return x, labels.reshape(-1).contiguous(), coef


TOKEN_SHAPES = [(1, 1, 1000), (1, 17, 32003), (3, 17, 1000), (3, 1, 32003), (8, 17, 1000), (8, 17, 32003)]


@pytest.mark.parametrize("B,T,V", TOKEN_SHAPES, ids=[f"B{b}-T{t}-V{v}" for b, t, v in TOKEN_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_op_shapes(dtype, B, T, V):
    x, labels, coef = token_inputs(B, T, V, dtype)
    check_token(x, labels, coef)


TOKEN_OPTIONS = {
    "softcap-saturating": dict(softcap=8.0),
    "softcap-gentle": dict(softcap=60.0),
    "temperature": dict(temperature=0.7),
    "softcap-and-temperature": dict(softcap=15.0, temperature=1.3),
    "no-grad": dict(coef=None),
    "inplace": dict(inplace=True),
    "inplace-softcap": dict(inplace=True, softcap=15.0, temperature=1.3),
    "grad-strided": dict(grad_strided=True),
    "grad-float32": dict(grad_dtype=torch.float32),
    "lse-in": dict(lse_in=True),
    "lse-in-softcap-temperature": dict(lse_in=True, softcap=15.0, temperature=1.3),
    "lse-in-no-grad": dict(lse_in=True, coef=None),
    "lse-in-inplace": dict(lse_in=True, inplace=True),
}


@pytest.mark.parametrize("case", list(TOKEN_OPTIONS), ids=list(TOKEN_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_op_options(dtype, case, capability):
    opts = dict(TOKEN_OPTIONS[case])
    # V = 5003: three vocabulary blocks of the kernel (kBlock = 2048), the last one partial
    x, labels, coef = token_inputs(3, 17, 5003, dtype, ignored_rows=(1,))
    coef = opts.pop("coef", coef)
    if opts.pop("lse_in", False):  # the saved logsumexp of a forward pass (generic log-prob mode)
        transforms = {k: v for k, v in opts.items() if k in ("softcap", "temperature")}
        opts["lse_in"] = token_truth(x, labels, None, **transforms)[1].float()
    check_token(x, labels, coef, **opts)


def test_token_op_float16(capability):
    x, labels, coef = token_inputs(3, 17, 1000, torch.float16, ignored_rows=(0,))
    check_token(x, labels, coef, softcap=15.0, temperature=1.3)
    check_token(x, labels, coef)


@pytest.mark.parametrize("layout", ["transposed-BT", "strided-V", "expanded-B"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_op_non_contiguous_logits(dtype, layout):
    """x is read through its strides, never copied: T-major, every other vocabulary entry, stride 0."""
    B, T, V = 3, 17, 1000
    x, labels, coef = token_inputs(B, T, V, dtype)
    if layout == "transposed-BT":
        xs = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "strided-V":
        xs = torch.stack([x, -x], dim=-1).reshape(B, T, 2 * V)[..., ::2]
    else:
        xs = x[:1].expand(B, T, V)
        x = xs.contiguous()
    assert not xs.is_contiguous() and torch.equal(xs, x)
    lp, lse = token_op("cpu", xs, labels)  # no gradient: x itself may be an expanded view
    lp_c, lse_c = token_op("cpu", x.contiguous(), labels)
    torch.testing.assert_close(lp, lp_c, rtol=0, atol=0)  # the same numbers as the contiguous path
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=0)
    if layout != "expanded-B":
        grad = torch.empty_like(x)
        token_op("cpu", xs, labels, coef, grad)
        grad_c = torch.empty_like(x)
        token_op("cpu", x.contiguous(), labels, coef, grad_c)
        torch.testing.assert_close(grad, grad_c, rtol=0, atol=0)
        check_token(xs, labels, coef)


def test_token_op_int32_labels_and_ignore_index():
    x, labels, coef = token_inputs(3, 17, 1000, torch.float32, label_dtype=torch.int32, ignored_rows=(2,))
    check_token(x, labels, coef)
    labels_m1 = torch.where(labels == IGNORE_INDEX, -1, labels)
    lp, lse = token_op("cpu", x, labels_m1, ignore_index=-1)
    lp_ref, lse_ref = token_op("cpu", x, labels)
    assert torch.equal(lp, lp_ref) and torch.equal(lse, lse_ref)


def test_token_op_masked_vocabulary():
    """−inf logits (a padded vocabulary), including whole blocks of them: p = 0 there, never NaN."""
    x, labels, coef = token_inputs(2, 5, 6000, torch.float32)
    x[..., 3000:] = float("-inf")
    x[..., 10:20] = float("-inf")
    labels = torch.where(labels == IGNORE_INDEX, labels, labels % 3000)
    check_token(x, labels, coef)
    lp, lse, grad = run_token("cpu", x, labels, coef, x.dtype)
    assert bool(torch.isfinite(lp).all()) and bool(torch.isfinite(grad).all())
    assert bool((grad[..., 3000:] == 0).all()) and bool((grad[..., 10:20] == 0).all())


def test_token_op_deterministic_across_threads():
    """Each row depends only on itself: the same bits with 1 or 2 threads and on every rerun."""
    x, labels, coef = token_inputs(4, 33, 32003, torch.float32, ignored_rows=(1,))
    outs = []
    n_threads = torch.get_num_threads()
    try:
        for threads in (1, max(2, n_threads), max(2, n_threads)):
            torch.set_num_threads(threads)
            grad = torch.empty_like(x)
            outs.append((*token_op("cpu", x, labels, coef, grad), grad))
    finally:
        torch.set_num_threads(n_threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_token_op_errors():
    x, labels, coef = token_inputs(2, 3, 100, torch.float32)
    bad = labels.clone()
    bad[4] = 100
    with pytest.raises(IndexError, match=r"labels\[4\] = 100"):
        token_op("cpu", x, bad)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        token_op("cpu", x.double(), labels)
    with pytest.raises(RuntimeError, match="coef is required"):
        torch.ops.varkernels.token_cpu(x, labels, None, torch.empty_like(x), None, None, 1.0, IGNORE_INDEX)
    with pytest.raises(RuntimeError, match="contiguous"):
        token_op("cpu", x, torch.stack([labels, labels], 1)[:, 0])
    with pytest.raises(RuntimeError, match="grad must be x itself"):
        buf = torch.zeros(2, 3, 101)
        token_op("cpu", buf[..., :100], labels, coef, buf[..., 1:])
    with pytest.raises(RuntimeError, match="overlapping elements"):
        token_op("cpu", x, labels, coef, torch.zeros(1, 3, 100).expand(2, 3, 100))


# --------------------------------------------------------------------------------------------
# fused_var_loss(backend="cpu") vs var_loss_reference
# --------------------------------------------------------------------------------------------

AUX_FIELDS = ("loss", "weights", "log_z", "policy_logps", "ess")


def build(B, T, V, dtype, *, ignored_rows=(), label_dtype=torch.int64, form="matrix"):
    labels = make_labels(B, T, V, ignored_rows=ignored_rows, dtype=label_dtype)
    logits = make_logits(B, T, V, dtype, labels=torch.where(labels == IGNORE_INDEX, 0, labels))
    rewards, ref_logps = make_pairs(labels, form=form)
    return logits, labels, rewards, ref_logps


def check_loss(logits, labels, rewards, ref_logps, *, inplace=False, view=None, **options):
    """fused_var_loss on backend "cpu" (optionally on a non-contiguous view / in place) vs the reference."""
    x = logits.detach().clone()
    if view is not None:
        x = view(x)
    x.requires_grad_(True)
    leaf = x
    inp = x
    if inplace:  # the documented in-place use: a non-leaf whose storage may be overwritten
        inp = x * 1
        inp.retain_grad()
    out = fused_var_loss(inp, labels, rewards, ref_logps, return_aux=True, backend="cpu", inplace=inplace, **options)
    out.loss.backward()
    grad = (inp if inplace else leaf).grad
    ref, ref_grad = reference_run(logits, labels, rewards, ref_logps, **options)
    truth, truth_grad = reference_run(logits, labels, rewards, ref_logps, float64=True, **options)
    for field in AUX_FIELDS:
        assert getattr(out, field).dtype == torch.float32
        assert_close(getattr(out, field), getattr(ref, field), getattr(truth, field), name=field)
    assert grad.dtype == logits.dtype
    assert_close(grad, ref_grad, truth_grad, name="logits grad")
    return out, grad


LOSS_SHAPES = [(1, 1, 1000), (1, 17, 32003), (3, 17, 1000), (3, 1, 32003), (8, 17, 1000), (8, 17, 32003)]


@pytest.mark.parametrize("B,T,V", LOSS_SHAPES, ids=[f"B{b}-T{t}-V{v}" for b, t, v in LOSS_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_var_loss_shapes(dtype, B, T, V):
    check_loss(*build(B, T, V, dtype))


def t_major(x):
    """[B, T, V] with T-major storage: a non-contiguous view, as after a transpose in a model."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


LOSS_OPTIONS = {
    "all-ignored-rows": (dict(ignored_rows=(0, 2)), dict()),
    "sum": (dict(), dict(logp_reduction="sum")),
    "importance": (dict(), dict(weighting="importance")),
    "vector-form": (dict(form="vector"), dict()),
    "softcap": (dict(), dict(softcap=8.0)),
    "temperature": (dict(), dict(temperature=0.7)),
    "softcap-and-temperature": (dict(), dict(softcap=15.0, temperature=1.3)),
    "shift-labels": (dict(), dict(shift_labels=True)),
    "int32-labels": (dict(label_dtype=torch.int32), dict()),
    "inplace": (dict(), dict(inplace=True)),
    "inplace-shift-softcap": (dict(), dict(inplace=True, shift_labels=True, softcap=15.0)),
    "non-contiguous": (dict(), dict(view=t_major)),
    "non-contiguous-inplace": (dict(), dict(inplace=True, view=t_major)),
}


@pytest.mark.parametrize("case", list(LOSS_OPTIONS), ids=list(LOSS_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_var_loss_options(dtype, case):
    build_kw, loss_kw = LOSS_OPTIONS[case]
    check_loss(*build(4, 17, 1000, dtype, **build_kw), **loss_kw)


def test_fused_var_loss_strided_vocabulary():
    """Logits that are every other column of a wider tensor (stride 2 along V)."""
    logits, labels, rewards, ref_logps = build(3, 17, 1000, torch.float32)
    check_loss(logits, labels, rewards, ref_logps,
               view=lambda x: torch.stack([x, x], -1).reshape(3, 17, 2000)[..., ::2])


def test_fused_var_loss_float16():
    check_loss(*build(4, 17, 1000, torch.float16), softcap=15.0, temperature=1.3)


def test_auto_backend_uses_extension_and_matches_cpu():
    logits, labels, rewards, ref_logps = build(3, 17, 1000, torch.float32)
    outs = []
    for backend in ("auto", "cpu"):
        x = logits.detach().clone().requires_grad_(True)
        loss = fused_var_loss(x, labels, rewards, ref_logps, backend=backend)
        loss.backward()
        outs.append((loss, x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sequence_logps_backward_uses_lse_in(dtype):
    """The generic log-prob mode: forward saves lse, backward is the one-sweep lse_in kernel."""
    logits, labels, _, _ = build(3, 17, 1000, dtype, ignored_rows=(1,))
    upstream = torch.randn(3)
    x = logits.detach().clone().requires_grad_(True)
    (sequence_logps(x, labels, backend="cpu", softcap=15.0) * upstream).sum().backward()
    grads = []
    for as_float64 in (False, True):
        xr = logits.detach().clone()
        xr = (xr.double() if as_float64 else xr).requires_grad_(True)
        s = sequence_logps_reference(xr, labels, softcap=15.0)
        (s * upstream.to(s.dtype)).sum().backward()
        grads.append(xr.grad)
    assert_close(x.grad, grads[0], grads[1], name="sequence_logps grad")


# --------------------------------------------------------------------------------------------
# Loader: fallback with one warning, clear error for backend="cpu"
# --------------------------------------------------------------------------------------------


def test_loader_without_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    saved = dict(csrc_loader._state)
    try:
        csrc_loader._reset_for_tests()
        monkeypatch.setattr(csrc_loader, "_load_aot", lambda: None)
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        monkeypatch.setenv("VARKERNELS_CACHE_DIR", str(tmp_path / "cache"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert csrc_loader.load_extension(required=False) is None
            assert csrc_loader.load_extension(required=False) is None
            logits, labels, rewards, ref_logps = build(2, 5, 100, torch.float32)
            fused_var_loss(logits, labels, rewards, ref_logps).backward()  # auto → the PyTorch path
        relevant = [w for w in caught if "C++ CPU kernel" in str(w.message)]
        assert len(relevant) == 1 and "no C++ compiler" in str(relevant[0].message)
        with pytest.raises(RuntimeError, match="backend='cpu' needs the C\\+\\+ CPU kernel.*no C\\+\\+ compiler"):
            fused_var_loss(logits, labels, rewards, ref_logps, backend="cpu")
    finally:
        csrc_loader._state.clear()
        csrc_loader._state.update(saved)


def test_loader_disabled_by_environment(monkeypatch):
    saved = dict(csrc_loader._state)
    try:
        csrc_loader._reset_for_tests()
        monkeypatch.setenv("VARKERNELS_DISABLE_CPP", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabling on purpose is not worth a warning
            assert csrc_loader.load_extension(required=False) is None
        with pytest.raises(RuntimeError, match="VARKERNELS_DISABLE_CPP"):
            csrc_loader.load_extension(required=True)
    finally:
        csrc_loader._state.clear()
        csrc_loader._state.update(saved)


def test_extension_matches_sources():
    """The loaded binary was built from the csrc/ in this tree (AOT or JIT)."""
    assert EXT.source_hash == csrc_loader.source_hash()


def test_binary_keeps_avx_code_in_its_own_namespaces():
    """A binary built here must load and run on any x86-64 CPU: instructions that need AVX (VEX /
    EVEX encoded, mnemonics v*) may appear only in the kernels of the AVX2 / AVX512 units, which
    run only when ATen reports that capability — not in shared inline code the linker could pick."""
    import platform
    import re
    import shutil
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"no AVX kernels on {platform.machine()}")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not installed")
    asm = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", EXT.__file__], capture_output=True,
                         text=True, check=True).stdout
    offenders, fn = set(), None
    for line in asm.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            fn = m.group(1)
            continue
        parts = line.split("\t")
        if fn and len(parts) >= 2 and parts[1].startswith("v") and not re.search(r"\bAVX(512|2)::", fn):
            offenders.add(fn)
    assert not offenders, f"AVX instructions outside the AVX kernels: {sorted(offenders)[:10]}"
