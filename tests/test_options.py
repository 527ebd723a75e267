"""Options of the public ops checked by type and range, numerics that stay finite, the C++ build notice
(issue 26 items 1, 2, 3 and 6; docs/design.md §2.4-2.5).

A fault probe found: booleans taking any truthy value (``inplace="False"`` overwrote the logits), integers
and floats reaching the operators' schemas (``chunk_size=2**63``, ``ignore_index=-100.0``), a loss of NaN
from finite inputs (``temperature=1e-39``, rewards 1e30 with ``beta=1e-10``, float64 rewards of 1e300), a
weight [0, H] blamed on ``hidden``, and a JIT build of minutes said only at INFO. Option checks run before
dispatch (varkernels/_prepare.py), so they are tested on ``backend="torch"``; the weights' numerics run on
both weight paths (PyTorch and the Triton kernel, by the interpreter on CPU tensors).
"""

from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import pytest
import torch

from varkernels import (
    VARLoss,
    csrc_loader,
    fused_linear_var_loss,
    fused_var_loss,
    linear_sequence_logps,
    linear_weighted_nll,
    sequence_logps,
    weighted_nll,
)
from varkernels.var.weights import var_weights

B, T, V, H = 3, 4, 7, 5
FUNCTIONS = {
    f.__name__: f
    for f in (fused_var_loss, fused_linear_var_loss, weighted_nll, linear_weighted_nll, sequence_logps,
              linear_sequence_logps)
}


def inputs(name: str) -> dict:
    """The positional tensors of ``name`` (leaves that require grad, so an in-place write would show)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (B, T), generator=g)
    kw = {"labels": labels}
    if "linear" in name:
        kw["hidden"] = torch.randn(B, T, H, generator=g).requires_grad_(True)
        kw["weight"] = torch.randn(V, H, generator=g).requires_grad_(True)
    else:
        kw["logits"] = torch.randn(B, T, V, generator=g).requires_grad_(True)
    if "var" in name:
        kw["rewards"] = torch.randn(B, B, generator=g)
        kw["ref_logps"] = -torch.rand(B, B, generator=g) * 5
    if "weighted" in name:
        kw["weights"] = torch.rand(B, generator=g)
    return kw


def call(name: str, kw: dict, **options):
    return FUNCTIONS[name](**kw, backend="torch", **options)


def accepts(name: str, option: str) -> bool:
    return option in inspect.signature(FUNCTIONS[name]).parameters


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_untouched(kw: dict, before: dict) -> None:
    for k, old in before.items():
        assert torch.equal(bits(kw[k]), bits(old)), f"{k} was modified although the call raised"
        assert kw[k].grad is None, f"a gradient reached {k} although the call raised"


# --------------------------------------------------------------------------------------------
# Item 1: option types and ranges, each error naming the option, what it must be and what was given
# --------------------------------------------------------------------------------------------

BAD = [  # (option, value, exception, message pattern)
    # booleans: a bool or numpy.bool_, nothing truthy
    ("inplace", "False", TypeError, r"^inplace must be a bool, got 'False' \(str\)$"),
    ("inplace", 1, TypeError, r"^inplace must be a bool, got 1 \(int\)$"),
    ("return_aux", "False", TypeError, r"^return_aux must be a bool, got 'False' \(str\)$"),
    ("return_aux", 0, TypeError, r"^return_aux must be a bool, got 0 \(int\)$"),
    ("shift_labels", "False", TypeError, r"^shift_labels must be a bool, got 'False' \(str\)$"),
    ("shift_labels", None, TypeError, r"^shift_labels must be a bool, got None \(NoneType\)$"),
    ("shift_labels", torch.tensor(True), TypeError, r"^shift_labels must be a bool, got .*\(Tensor\): pass a Python"),
    # integers: int or numpy int in int64; chunk_size positive
    ("ignore_index", -100.0, TypeError, r"^ignore_index must be an int, got -100\.0 \(float\)$"),
    ("ignore_index", True, TypeError, r"^ignore_index must be an int, got True \(bool\)$"),
    ("ignore_index", 2**63, ValueError, r"^ignore_index must be an int in \[-9223372036854775808, 922337203685477"),
    ("chunk_size", 2**63, ValueError, r"^chunk_size must be a positive int <= 9223372036854775807 .*got 9223372036854"),
    ("chunk_size", 2.0, TypeError, r"^chunk_size must be a positive int or None, got 2\.0$"),
    ("chunk_size", True, TypeError, r"^chunk_size must be a positive int or None, got True$"),
    # floats: finite, and they and their inverse normal float32
    ("temperature", 1e-39, ValueError, r"^temperature must be in \[1\.175e-38, 3\.403e\+38\].*got 1e-39; rescale the"),
    ("temperature", True, TypeError, r"^temperature must be a Python number > 0, got bool True$"),
    ("softcap", 1e39, ValueError, r"^softcap must be in \[1\.175e-38, 3\.403e\+38\].*got 1e\+39; use softcap=None"),
    ("softcap", 1e-39, ValueError, r"^softcap must be in .*got 1e-39"),
    ("beta", 1e-39, ValueError, r"^beta must be in \[1\.175e-38, 3\.403e\+38\].*got 1e-39; rescale the rewards"),
    ("beta", False, TypeError, r"^beta must be a Python number > 0, got bool False$"),
]
BAD_CASES = [
    pytest.param(name, option, value, exc, pattern, id=f"{name}-{option}-{value!r}")
    for option, value, exc, pattern in BAD
    for name in FUNCTIONS
    if accepts(name, option)
]


@pytest.mark.parametrize("name,option,value,exc,pattern", BAD_CASES)
def test_bad_option_is_named_and_nothing_is_touched(name, option, value, exc, pattern):
    kw = inputs(name)
    before = {k: v.detach().clone() for k, v in kw.items()}
    with pytest.raises(exc, match=pattern):
        out = call(name, kw, **{option: value})
        (out.loss if isinstance(out, tuple) else out).sum().backward()
    assert_untouched(kw, before)


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if accepts(n, "inplace")])
def test_inplace_false_as_a_string_keeps_the_logits(name):
    """The probe's data loss: ``inplace="False"`` (truthy) overwrote the caller's logits with their gradient."""
    kw = inputs(name)
    logits = kw["logits"].detach().clone()
    try:
        call(name, kw, inplace="False")
    except TypeError:
        pass
    assert torch.equal(bits(kw["logits"]), bits(logits)), "the caller's logits were overwritten"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_option_check_precedes_every_backend(backend):
    """One case per backend: the checks run before dispatch, so no backend sees ``inplace="False"``."""
    kw = inputs("fused_var_loss")
    logits = kw["logits"].detach().clone()
    with pytest.raises(TypeError, match=r"^inplace must be a bool, got 'False' \(str\)$"):
        fused_var_loss(**kw, inplace="False", backend=backend)
    assert torch.equal(bits(kw["logits"]), bits(logits)) and kw["logits"].grad is None


GOOD = [  # (option, value, the same option as a plain Python value)
    ("inplace", np.bool_(False), False),
    ("return_aux", np.bool_(True), True),
    ("shift_labels", np.bool_(True), True),
    ("ignore_index", np.int64(-100), -100),
    ("ignore_index", np.int32(-1), -1),
    ("chunk_size", np.int64(2), 2),
    ("chunk_size", 2**63 - 1, 10**9),  # the int64 maximum: one chunk, like any chunk_size >= B·T
    ("temperature", np.float32(0.75), 0.75),
    ("temperature", 2, 2.0),
    ("softcap", np.float64(4.0), 4.0),
    ("beta", np.float32(0.5), 0.5),
    ("beta", 2, 2.0),
]
GOOD_CASES = [
    pytest.param(name, option, value, plain, id=f"{name}-{option}-{type(value).__name__}-{value!r}")
    for option, value, plain in GOOD
    for name in FUNCTIONS
    if accepts(name, option)
]


@pytest.mark.parametrize("name,option,value,plain", GOOD_CASES)
def test_numpy_scalars_and_ints_are_taken_as_their_python_values(name, option, value, plain):
    kw = inputs(name)
    got, want = call(name, kw, **{option: value}), call(name, kw, **{option: plain})
    got, want = (got.loss, want.loss) if isinstance(got, tuple) else (got, want)
    assert torch.equal(got, want), f"{option}={value!r} gave {got}, {plain!r} gave {want}"


@pytest.mark.parametrize("option,value,exc,pattern", [
    ("inplace", "yes", TypeError, r"^inplace must be a bool, got 'yes' \(str\)$"),
    ("return_aux", 1, TypeError, r"^return_aux must be a bool, got 1 \(int\)$"),
    ("shift_labels", "False", TypeError, r"^shift_labels must be a bool"),
    ("ignore_index", -100.0, TypeError, r"^ignore_index must be an int, got -100\.0 \(float\)$"),
    ("temperature", 1e-39, ValueError, r"^temperature must be in"),
    ("beta", 1e-39, ValueError, r"^beta must be in"),
])
def test_varloss_checks_every_option_at_construction(option, value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        VARLoss(**{option: value})


def test_varloss_takes_numpy_options():
    kw = inputs("fused_var_loss")
    loss = VARLoss(beta=np.float32(0.5), shift_labels=np.bool_(True), backend="torch")(
        kw["logits"], kw["labels"], kw["rewards"], kw["ref_logps"])
    ref = fused_var_loss(**kw, beta=0.5, shift_labels=True, backend="torch")
    assert torch.equal(loss, ref)


# --------------------------------------------------------------------------------------------
# Item 3: the right argument blamed
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if "linear" in n])
def test_empty_weight_is_blamed_on_weight(name):
    kw = inputs(name)
    kw["weight"] = torch.randn(0, H)
    with pytest.raises(ValueError, match=r"^weight must be non-empty.*\(0, 5\)"):
        call(name, kw)


# --------------------------------------------------------------------------------------------
# Item 2: no silent non-finite result from finite inputs
# --------------------------------------------------------------------------------------------

WEIGHT_BACKENDS = ("torch", "triton")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter, by design


def tied_rewards(scale: float, dtype=torch.float32) -> torch.Tensor:
    """[B, B] rewards whose every row is (scale, scale, −scale): columns 0 and 1 tie, column 2 is far below."""
    return torch.tensor([[1.0, 1.0, -1.0]] * B, dtype=torch.float64).mul(scale).to(dtype)


def tied_weights(Q: torch.Tensor, weighting: str) -> torch.Tensor:
    """The weights of :func:`tied_rewards` by hand (docs/design.md §1.4-1.5), in float64: in each row the
    columns 0 and 1 share the softmax by their Q (A = s/β + Q for both), column 2 (A lower by 2·s/β) gets
    nothing. Plain float64 would not do: s/β + Q rounds Q away when s/β = 1e40."""
    Q = Q.double()
    denom = Q[:, :2].exp().sum(dim=1)
    num = Q.diagonal().exp() if weighting == "posterior" else torch.ones(B, dtype=torch.float64)
    return torch.where(torch.arange(B) < 2, B * num / denom, 0.0)


@pytest.mark.parametrize("weighting", ["posterior", "importance"])
@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
def test_rewards_over_beta_overflowing_float32(backend, weighting):
    """r/beta = 1e40 does not fit float32: the weights were NaN (inf − inf in the row's logsumexp)."""
    R, Q = tied_rewards(1e30), -torch.rand(B, B) * 3
    w, log_z = var_weights(R, Q, groups=1, group_size=B, cross_pairs=True, beta=1e-10, weighting=weighting,
                           backend=backend)
    assert torch.isfinite(w).all(), w
    torch.testing.assert_close(w, tied_weights(Q, weighting).float(), rtol=1e-6, atol=0)
    assert w[2] == 0 and w[:2].gt(0).all(), w  # the tie shares the mass, the far column gets none
    assert (log_z == math.inf).all(), "log Ẑ ≈ 1e40 saturates to +inf in float32"


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
def test_float64_rewards_beyond_float32(backend):
    """float64 rewards of 1e300 are finite (they pass the checks) but were cast to float32 (inf) first."""
    R, Q = tied_rewards(1e300, torch.float64), -torch.rand(B, B, dtype=torch.float64) * 3
    w, _ = var_weights(R, Q, groups=1, group_size=B, cross_pairs=True, beta=1.0, weighting="posterior",
                       backend=backend)
    torch.testing.assert_close(w, tied_weights(Q, "posterior").float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
def test_shared_context_form_overflowing(backend):
    R, Q = tied_rewards(1e30)[0], -torch.rand(B) * 3
    w, _ = var_weights(R, Q, groups=1, group_size=B, cross_pairs=False, beta=1e-10, weighting="posterior",
                       backend=backend)
    torch.testing.assert_close(w, tied_weights(Q.expand(B, B), "posterior").float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
def test_only_overflowing_rows_change(backend):
    """Group 0 overflows, group 1 is ordinary: group 1's weights and log Ẑ are those of the unchanged maths,
    bit for bit (computed alone and by the plain expression)."""
    R = torch.stack([tied_rewards(1e30), torch.randn(B, B)])
    Q = -torch.rand(2, B, B) * 3
    Q[1, 0, 2] = -math.inf
    w, log_z = var_weights(R, Q, groups=2, group_size=B, cross_pairs=True, beta=1e-10, weighting="posterior",
                           backend=backend)
    w1, z1 = var_weights(R[1], Q[1], groups=1, group_size=B, cross_pairs=True, beta=1e-10, weighting="posterior",
                         backend=backend)
    assert torch.equal(bits(w[B:]), bits(w1)) and torch.equal(bits(log_z[B:]), bits(z1))
    if backend == "torch":
        A = R[1] / 1e-10 + Q[1]
        z = torch.logsumexp(A, dim=-1) - math.log(B)
        assert torch.equal(bits(z1), bits(z)) and torch.equal(bits(w1), bits(torch.exp(A.diagonal() - z)))
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("backend", WEIGHT_BACKENDS)
def test_loss_is_finite_when_rewards_over_beta_overflow(backend):
    kw = inputs("fused_var_loss")
    kw["rewards"] = tied_rewards(1e30)
    out = fused_var_loss(**kw, beta=1e-10, return_aux=True, backend=backend)
    assert torch.isfinite(out.loss) and torch.isfinite(out.weights).all(), out


def test_importance_overflow_still_raises_naming_the_options():
    """Genuinely unrepresentable: importance weights e^{R_ii/β − log Ẑ_i} beyond float32 (docs/design.md §1.5)."""
    R, Q = tied_rewards(1e30), torch.full((B, B), -200.0)
    with pytest.raises(FloatingPointError, match=r"(?s)weighting='importance'.*logp_reduction='mean'.*beta"):
        var_weights(R, Q, groups=1, group_size=B, cross_pairs=True, beta=1e-10, weighting="importance",
                    backend="torch")


def test_temperature_below_float32_inverse_raised_not_nan():
    """1/1e-39 overflows float32: the loss was NaN; now an error naming temperature (also on the C++ path)."""
    kw = inputs("sequence_logps")
    for backend in ("torch", "cpu"):
        with pytest.raises(ValueError, match=r"^temperature must be in"):
            sequence_logps(**kw, temperature=1e-39, backend=backend)


# --------------------------------------------------------------------------------------------
# Item 6: the JIT build says so, at WARNING, once per process
# --------------------------------------------------------------------------------------------


def test_jit_build_is_announced_once_at_warning(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    built = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: built.append(kw["build_directory"]) or "module")
    monkeypatch.setenv("VARKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(csrc_loader, "_announced", set(), raising=False)
    with caplog.at_level(logging.INFO, logger="varkernels"):
        assert csrc_loader._build_jit() == "module"
        assert csrc_loader._build_jit() == "module"
    warnings_ = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(built) == 2 and len(warnings_) == 1, [r.getMessage() for r in caplog.records]
    message = warnings_[0].getMessage()
    assert "building the C++ CPU kernel" in message and str(tmp_path) in message and "minutes" in message


def test_cached_jit_build_is_not_announced(tmp_path, monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "module")
    monkeypatch.setenv("VARKERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(csrc_loader, "_announced", set(), raising=False)
    build_dir = csrc_loader.cache_dir()
    build_dir.mkdir(parents=True)
    (build_dir / f"{csrc_loader.MODULE_NAME}.so").write_bytes(b"")  # newer than the sources: a cache hit
    with caplog.at_level(logging.INFO, logger="varkernels"):
        csrc_loader._build_jit()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("loading the JIT build" in r.getMessage() for r in caplog.records)
