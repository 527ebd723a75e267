"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without spilling (docs/design.md §4.2).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` builds
the cubin on the CPU and ``cuobjdump --dump-resource-usage`` reads its REG / SHARED / LOCAL.
LOCAL > 0 means registers spilled to local memory.

"No spills" is LOCAL 0 and STACK 0: triton 3.9's ptxas puts spill slots in the stack frame
(STL/LDL in the SASS) and reports them as STACK with LOCAL 0 (see tools/aot.py).

What is compiled is what the launchers launch: each launcher (``token_triton_launch``,
``var_weights_triton_launch``, ``scale_triton_launch``) is called with ``meta`` tensors of the production shape while
its kernel is replaced by a recorder, and ``launch_spec`` specialises the recorded arguments as
``JITFunction.run`` would on a GPU (BLOCK_V, num_warps, ``None`` pointers → constexpr, unit
strides → constexpr 1, 16-divisible pointers and integers).

The vocabulary size is a runtime argument: BLOCK_V = min(next_pow2(V), MAX_FUSED_SIZE) is 4096
for every V tested and 32000, 128256, 256000 are all multiples of 16, so the three V give the
same specialisation and the same cubin (``test_vocab_size_is_a_runtime_argument`` checks it).
Each distinct (kernel, specialisation, arch) is compiled once, by two worker processes, and
looked up by every test that needs it; 32003 (not a multiple of 16) is a separate compile.

The entropy specialisations (``HAS_ENTROPY``: the token op's optional entropy output) are compiled
at the single-pass caps and in the tiled kernel, with and without the gradient and softcap
(``test_entropy_token_kernel_no_spills``, their own fixture).

The single-pass kernel (rows held on chip, ``_token_kernel_single``) is compiled at the
configurations ``token_kernel_config`` gives: V = 32000 and its cap 32768 (one specialisation,
BLOCK_V = 32768, num_warps = 32), with softcap 16000 and its cap 16384 (BLOCK_V = 16384,
num_warps = 32), odd V 32003 in fp32 and 16003 in 16-bit dtypes, for every variant and dtype. It
is launched by ``launch_token`` (tests/token_launch.py), the mirror of ``token_triton`` with that table.
"""

from __future__ import annotations

import functools

import pytest
import torch
from token_launch import launch_token

from tools import aot
from varkernels.core import _triton_kernels
from varkernels.core.autograd import scale_triton_launch
from varkernels.core.token import token_triton_launch
from varkernels.var import _weights_kernel
from varkernels.var.weights import var_weights_triton_launch

ARCHS = ("sm_80", "sm_90")
VOCABS = (32000, 128256, 256000)
ODD_VOCAB = 32003  # not a multiple of 16: no divisibility hint on V and the strides
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
B, T = 8, 512  # production-like shape; only meta tensors are allocated
TOKEN_KERNELS = ("_token_kernel", "_token_kernel_single")  # whichever the launcher picks

# Every meaningful combination of the token kernel's switches, named after the op that launches it.
# (HAS_LSE_IN without HAS_GRAD is never launched.)
TOKEN_VARIANTS = {
    # name: (HAS_GRAD, HAS_LSE_IN, softcap)
    "var_loss": (True, False, None),  # fused_var_loss forward: log-probs and the gradient in one launch
    "var_loss_softcap": (True, False, 30.0),
    "logps_fwd": (False, False, None),  # sequence_logps forward, reference scoring under no_grad
    "logps_fwd_softcap": (False, False, 30.0),
    "logps_bwd": (True, True, None),  # sequence_logps backward from the saved logsumexp
    "logps_bwd_softcap": (True, True, 30.0),
}


def _require_cuobjdump():
    if aot.cuobjdump_path() is None:
        pytest.skip("cuobjdump not found (neither in the triton wheel under backends/nvidia/bin nor on PATH)")


def _only(launches):
    assert len(launches) == 1, f"expected one launch, got {[launch.name for launch in launches]}"
    return aot.launch_spec(launches[0].kernel, launches[0].kwargs)


@functools.cache
def token_spec(variant: str, dtype: str, V: int, labels_dtype=torch.int64) -> aot.KernelSpec:
    has_grad, has_lse_in, softcap = TOKEN_VARIANTS[variant]
    N = B * T
    x = torch.empty(B, T, V, dtype=DTYPES[dtype], device="meta")
    labels = torch.empty(N, dtype=labels_dtype, device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    with aot.capture_launches(_triton_kernels, *TOKEN_KERNELS) as launches:
        token_triton_launch(
            x, labels,
            torch.empty(N, **f32) if has_grad else None,  # coef
            torch.empty_like(x) if has_grad else None,  # grad
            torch.empty(N, **f32) if has_lse_in else None,  # lse_in
            softcap, 1.0, -100,  # softcap, inv_temperature, ignore_index
        )
    return _only(launches)


@functools.cache
def single_spec(variant: str, dtype: str, V: int) -> aot.KernelSpec:
    """The launch of ``launch_token`` (token_kernel_config's choice), which must be the single-pass kernel."""
    has_grad, has_lse_in, softcap = TOKEN_VARIANTS[variant]
    N = B * T
    x = torch.empty(B, T, V, dtype=DTYPES[dtype], device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    with aot.capture_launches(_triton_kernels, *TOKEN_KERNELS) as launches:
        launch_token(
            x, torch.empty(N, dtype=torch.int64, device="meta"),
            torch.empty(N, **f32) if has_grad else None,
            torch.empty_like(x) if has_grad else None,
            torch.empty(N, **f32) if has_lse_in else None,
            softcap=softcap,
        )
    assert [launch.name for launch in launches] == ["_token_kernel_single"], (variant, dtype, V)
    return _only(launches)


# The entropy specialisations (HAS_ENTROPY, the token op's optional ``entropy`` output), launched by the weighted
# NLL with return_aux (with the gradient) and by the log-prob functions with return_entropy (without): at the
# single-pass kernel's largest rows and in the tiled kernel.
ENTROPY_VARIANTS = {"nll_aux_entropy": True, "logps_fwd_entropy": False}  # name: HAS_GRAD


@functools.cache
def entropy_spec(variant: str, softcap, dtype: str, V: int) -> aot.KernelSpec:
    has_grad = ENTROPY_VARIANTS[variant]
    N = B * T
    x = torch.empty(B, T, V, dtype=DTYPES[dtype], device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    with aot.capture_launches(_triton_kernels, *TOKEN_KERNELS) as launches:
        token_triton_launch(
            x, torch.empty(N, dtype=torch.int64, device="meta"),
            torch.empty(N, **f32) if has_grad else None, torch.empty_like(x) if has_grad else None, None,
            softcap, 1.0, -100, entropy=torch.empty(N, **f32),
        )
    spec = _only(launches)
    assert dict(spec.constexprs)["HAS_ENTROPY"] is True
    return spec


ENTROPY_CASES = [(v, c, d, V) for v in ENTROPY_VARIANTS for c in (None, 30.0) for d in ("fp32", "bf16")
                 for V in (_triton_kernels.SINGLE_PASS_MAX_V_TIGHT if c else _triton_kernels.SINGLE_PASS_MAX_V, 128256)]


@pytest.fixture(scope="module")
def compiled_entropy():
    _require_cuobjdump()
    specs = list(dict.fromkeys(entropy_spec(*c) for c in ENTROPY_CASES))
    return aot.compile_specs(specs, archs=ARCHS, workers=2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant,softcap,dtype,V", ENTROPY_CASES)
def test_entropy_token_kernel_no_spills(compiled_entropy, variant, softcap, dtype, V, arch):
    """The entropy specialisations fit the configuration table of the default ones (one more block reduction)."""
    spec = entropy_spec(variant, softcap, dtype, V)
    _assert_no_spills(compiled_entropy[(spec, arch)], spec)


@functools.cache
def weights_spec(batch: int, weighting: str, form: str, dtype: str) -> aot.KernelSpec:
    shape = (1, batch, batch) if form == "matrix" else (1, batch)
    r = torch.empty(shape, dtype=DTYPES[dtype], device="meta")
    with aot.capture_launches(_weights_kernel, "_var_weights_kernel") as launches:
        var_weights_triton_launch(r, torch.empty_like(r), 1.0, weighting == "posterior")
    return _only(launches)


@functools.cache
def scale_spec(dtype: str, V: int) -> aot.KernelSpec:
    grad = torch.empty(B, T, V, dtype=DTYPES[dtype], device="meta")
    with aot.capture_launches(_triton_kernels, "_scale_kernel") as launches:
        scale_triton_launch(grad, torch.empty((), dtype=torch.float32, device="meta"))
    return _only(launches)


TOKEN_CASES = [(v, d, V) for v in TOKEN_VARIANTS for d in DTYPES for V in VOCABS]
TOKEN_EXTRA_CASES = [("var_loss", d, ODD_VOCAB, torch.int64) for d in DTYPES] + [
    ("var_loss", d, 128256, torch.int32) for d in DTYPES  # labels given as int32
]
SINGLE_VOCABS = {False: (32000, _triton_kernels.SINGLE_PASS_MAX_V),  # without softcap: V and the cap
                 True: (16000, _triton_kernels.SINGLE_PASS_MAX_V_TIGHT)}  # with softcap
SINGLE_CASES = [(v, d, V) for v in TOKEN_VARIANTS for d in DTYPES
                for V in SINGLE_VOCABS[TOKEN_VARIANTS[v][2] is not None]]
SINGLE_CASES += [(v, d, 32003 if d == "fp32" else 16003)  # rows not 16-byte aligned
                 for v in ("var_loss", "logps_bwd") for d in DTYPES]
WEIGHTS_CASES = [(b, w, f, "fp32") for b in (8, 64) for w in ("posterior", "importance") for f in ("matrix", "vector")]
WEIGHTS_CASES += [(8, "posterior", "matrix", "bf16")]
SCALE_CASES = [(d, V) for d in DTYPES for V in VOCABS]


def _distinct(cases, spec_of, seen: set) -> list:
    """The cases whose specialisation no case before them has: cases of one specialisation compile to one cubin,
    so their resource checks are one test (which cases share one is checked by test_vocab_size_is_a_runtime_argument
    and test_single_pass_cap_is_one_specialisation). Specs come from meta-tensor launches: no GPU, no compile."""
    out = []
    for case in cases:
        spec = spec_of(*case)
        if spec not in seen:
            seen.add(spec)
            out.append(case)
    return out


_SEEN: set = set()
TOKEN_CHECKED = _distinct(TOKEN_CASES, token_spec, _SEEN)
TOKEN_EXTRA_CHECKED = _distinct(TOKEN_EXTRA_CASES, token_spec, _SEEN)
SINGLE_CHECKED = _distinct(SINGLE_CASES, single_spec, _SEEN)
WEIGHTS_CHECKED = _distinct(WEIGHTS_CASES, weights_spec, _SEEN)
SCALE_CHECKED = _distinct(SCALE_CASES, scale_spec, _SEEN)


@pytest.fixture(scope="module")
def compiled():
    """{(spec, arch): resources} for every spec of this module, compiled in one batch."""
    _require_cuobjdump()
    specs = [token_spec(*c) for c in TOKEN_CASES] + [token_spec(*c) for c in TOKEN_EXTRA_CASES]
    specs += [single_spec(*c) for c in SINGLE_CASES]
    specs += [weights_spec(*c) for c in WEIGHTS_CASES] + [scale_spec(*c) for c in SCALE_CASES]
    return aot.compile_specs(list(dict.fromkeys(specs)), archs=ARCHS, workers=2)


def _assert_no_spills(res: dict, spec: aot.KernelSpec):
    assert res["local"] == 0, (
        f"{spec.describe()} on {res['arch']}: {res['local']} bytes of local memory per thread (register "
        f"spills) with {res['regs']} registers"
    )
    assert res["stack"] == 0, (
        f"{spec.describe()} on {res['arch']}: a {res['stack']}-byte stack frame per thread (register spills "
        f"that ptxas placed in the stack) with {res['regs']} registers"
    )
    assert not res["spills"]
    assert res["regs"] <= aot.ARCH_LIMITS[int(res["arch"][3:])]["max_regs_per_thread"], res


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant,dtype,V", TOKEN_CHECKED)
def test_token_kernel_no_spills(compiled, variant, dtype, V, arch):
    spec = token_spec(variant, dtype, V)
    _assert_no_spills(compiled[(spec, arch)], spec)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant,dtype,V,labels_dtype", TOKEN_EXTRA_CHECKED)
def test_token_kernel_no_spills_odd_vocab_and_int32_labels(compiled, variant, dtype, V, labels_dtype, arch):
    spec = token_spec(variant, dtype, V, labels_dtype)
    _assert_no_spills(compiled[(spec, arch)], spec)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant,dtype,V", SINGLE_CHECKED)
def test_single_pass_kernel_no_spills(compiled, variant, dtype, V, arch):
    spec = single_spec(variant, dtype, V)
    _assert_no_spills(compiled[(spec, arch)], spec)


def test_single_pass_cap_is_one_specialisation():
    """V = 32000 and the cap 32768 (and 16000 / 16384 with softcap) compile to the same cubin, and every
    single-pass launch has the BLOCK_V and num_warps of token_kernel_config."""
    for variant, dtype, V in SINGLE_CASES:
        spec = single_spec(variant, dtype, V)
        _, block, num_warps = _triton_kernels.token_kernel_config(V, DTYPES[dtype], softcap=TOKEN_VARIANTS[variant][2])
        assert (dict(spec.constexprs)["BLOCK_V"], spec.num_warps) == (block, num_warps) and block >= V
    for variant in TOKEN_VARIANTS:
        for dtype in DTYPES:
            vocabs = SINGLE_VOCABS[TOKEN_VARIANTS[variant][2] is not None]
            assert len({single_spec(variant, dtype, V) for V in vocabs}) == 1, (variant, dtype)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch,weighting,form,dtype", WEIGHTS_CHECKED)
def test_weights_kernel_no_spills(compiled, batch, weighting, form, dtype, arch):
    spec = weights_spec(batch, weighting, form, dtype)
    _assert_no_spills(compiled[(spec, arch)], spec)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,V", SCALE_CHECKED)
def test_scale_kernel_no_spills(compiled, dtype, V, arch):
    spec = scale_spec(dtype, V)
    _assert_no_spills(compiled[(spec, arch)], spec)


@pytest.mark.parametrize("variant", TOKEN_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_vocab_size_is_a_runtime_argument(variant, dtype):
    """V ∈ VOCABS launched with the tiled kernel: one specialisation (BLOCK_V = 4096, V and strides
    16-divisible), so one cubin. (A launcher that takes the single-pass kernel for V ≤ its cap
    launches it at 32000; that launch is checked against token_kernel_config.)"""
    specs = {V: token_spec(variant, dtype, V) for V in VOCABS}
    tiled = {s for s in specs.values() if s.name == "_token_kernel"}
    assert len(tiled) == 1, [s.describe() for s in tiled]
    assert dict(next(iter(tiled)).constexprs)["BLOCK_V"] == _triton_kernels.MAX_FUSED_SIZE
    for V, spec in specs.items():
        if spec.name == "_token_kernel_single":
            softcap = TOKEN_VARIANTS[variant][2]
            _, block, num_warps = _triton_kernels.token_kernel_config(V, DTYPES[dtype], softcap=softcap)
            assert (dict(spec.constexprs)["BLOCK_V"], spec.num_warps) == (block, num_warps)


def test_launch_spec_matches_the_launch():
    """The captured specialisation carries the launcher's choices: heuristics, None pointers,
    num_warps, the unit stride, and the GPU configuration (no interpreter-only switches)."""
    spec = token_spec("logps_fwd", "bf16", 128256)
    sig, ce = dict(spec.signature), dict(spec.constexprs)
    assert spec.num_warps == _triton_kernels.TOKEN_NUM_WARPS
    assert (ce["HAS_GRAD"], ce["HAS_LSE_IN"], ce["HAS_SOFTCAP"]) == (False, False, False)
    assert ce["grad_ptr"] is None and ce["lse_in_ptr"] is None and ce["softcap"] is None
    assert ce["stride_xv"] == 1 and sig["x_ptr"] == "*bf16" and sig["V"] == "i32"
    if "RNE_BF16" in ce:  # the interpreter-only rounding switch is off in a GPU launch
        assert ce["RNE_BF16"] is False


def test_compile_kernel_with_a_written_signature():
    """The hand-written form: HAS_* switches explicit, None pointers as constexpr None."""
    _require_cuobjdump()
    spec = token_spec("var_loss", "fp32", 32000)
    signature = {name: ty for name, ty in spec.signature}
    constexprs = {name: value for name, value in spec.constexprs}
    res = aot.compile_kernel(_triton_kernels._token_kernel, signature, constexprs, 90, spec.num_warps)
    assert res["arch"] == "sm_90" and res["local"] == 0 and 0 < res["regs"] <= 255
    assert 0 < res["est_occupancy"] <= 1
    with pytest.raises(ValueError, match="constexprs missing"):
        aot.compile_kernel(_triton_kernels._token_kernel, signature, {}, 90, spec.num_warps)


def test_parse_resource_usage():
    text = (
        "\nResource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function _token_kernel:\n"
        "  REG:56 STACK:0 SHARED:1024 LOCAL:16 CONSTANT[0]:448 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    usage = aot.parse_resource_usage(text)
    assert usage == {"_token_kernel": {"REG": 56, "STACK": 0, "SHARED": 1024, "LOCAL": 16, "CONSTANT[0]": 448,
                                           "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0}}


def test_occupancy_estimate():
    # 56 registers × 32 lanes = 1792 per warp: 9 warps per 16 K-register sub-partition, 2 per block
    # of 8 warps → 4 blocks, 32 of 64 warps.
    est = aot.occupancy_estimate(56, 32, 8, 80)
    assert (est["est_blocks_per_sm"], est["est_warps_per_sm"], est["est_limiter"]) == (4, 32, "registers")
    assert aot.occupancy_estimate(16, 0, 4, 90)["est_limiter"] == "warps"
    assert aot.occupancy_estimate(32, 100 * 1024, 4, 80)["est_limiter"] == "shared"
