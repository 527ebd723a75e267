"""Bad input to ``fused_var_loss`` (docs/design.md §2): a ValueError / TypeError that names the argument,
raised before anything of the caller's is touched — also with ``inplace=True``.
"""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE_INDEX, make_labels, make_logits, make_pairs

from varkernels import fused_var_loss

B, T, V = 3, 5, 50


def valid_call() -> dict:
    """Keyword arguments of a valid call; every case below breaks exactly one thing."""
    labels = make_labels(B, T, V)
    rewards, ref_logps = make_pairs(labels)
    logits = make_logits(B, T, V, labels=torch.where(labels == IGNORE_INDEX, 0, labels))
    return dict(logits=logits, labels=labels, rewards=rewards, ref_logps=ref_logps)


def _set(key, value):
    return lambda kw: kw.update({key: value(kw) if callable(value) else value})


def _poke(key, index, value):
    def edit(kw):
        t = kw[key].detach().clone()
        t[index] = value
        kw[key] = t.requires_grad_(kw[key].requires_grad)

    return edit


# (id, edit of the valid call, exception, pattern the message must match)
BAD_INPUTS = [
    # shapes
    ("labels-T", _set("labels", lambda kw: torch.zeros(B, T + 1, dtype=torch.long)), ValueError,
     r"labels.*\(3, 5\).*\(3, 6\)"),
    ("labels-B", _set("labels", lambda kw: torch.zeros(B + 1, T, dtype=torch.long)), ValueError,
     r"labels.*\(3, 5\).*\(4, 5\)"),
    ("labels-1d", _set("labels", lambda kw: torch.zeros(B * T, dtype=torch.long)), ValueError, r"labels.*\(15,\)"),
    ("logits-2d", _set("logits", lambda kw: kw["logits"].detach()[0].clone()), ValueError, r"logits.*\(5, 50\)"),
    ("logits-empty-T", _set("logits", lambda kw: torch.zeros(B, 0, V)), ValueError, r"logits"),
    ("rewards-B", _set("rewards", lambda kw: torch.zeros(B + 1)), ValueError, r"rewards.*\(3,\).*\(4,\)"),
    ("rewards-BxB1", _set("rewards", lambda kw: torch.zeros(B, B + 1)), ValueError, r"rewards.*\(3, 3\).*\(3, 4\)"),
    ("ref_logps-B", _set("ref_logps", lambda kw: torch.zeros(B + 1, B + 1)), ValueError,
     r"ref_logps.*\(3, 3\).*\(4, 4\)"),
    ("mixed-forms", _set("ref_logps", lambda kw: torch.zeros(B)), ValueError, r"rewards and ref_logps"),
    ("mixed-forms-2", _set("rewards", lambda kw: torch.zeros(B)), ValueError, r"rewards and ref_logps"),
    # label values
    ("label-eq-V", _poke("labels", (1, 3), V), ValueError, r"labels.*\[0, 50\).*got 50"),
    ("label-negative", _poke("labels", (2, 4), -1), ValueError, r"labels.*got -1"),
    ("label-other-ignore", lambda kw: kw.update(ignore_index=-1), ValueError, r"labels.*ignore_index=-1.*-100"),
    # scalars
    ("beta-zero", _set("beta", 0.0), ValueError, r"beta.*> 0.*0\.0"),
    ("beta-negative", _set("beta", -1.0), ValueError, r"beta"),
    ("beta-nan", _set("beta", float("nan")), ValueError, r"beta"),
    ("beta-inf", _set("beta", float("inf")), ValueError, r"beta"),
    ("beta-tensor", _set("beta", torch.tensor(1.0)), TypeError, r"beta"),
    ("beta-str", _set("beta", "1.0"), TypeError, r"beta"),
    ("temperature-zero", _set("temperature", 0.0), ValueError, r"temperature"),
    ("temperature-negative", _set("temperature", -0.7), ValueError, r"temperature"),
    ("softcap-zero", _set("softcap", 0.0), ValueError, r"softcap"),
    ("softcap-negative", _set("softcap", -30.0), ValueError, r"softcap"),
    # non-finite rewards / reference log-probs
    ("rewards-nan", _poke("rewards", (0, 1), float("nan")), ValueError, r"rewards"),
    ("rewards-posinf", _poke("rewards", (2, 2), float("inf")), ValueError, r"rewards"),
    ("ref_logps-nan", _poke("ref_logps", (1, 0), float("nan")), ValueError, r"ref_logps"),
    ("ref_logps-posinf", _poke("ref_logps", (0, 0), float("inf")), ValueError, r"ref_logps"),
    # option strings
    ("weighting", _set("weighting", "Posterior"), ValueError, r"weighting.*'posterior'.*'importance'.*'Posterior'"),
    ("logp_reduction", _set("logp_reduction", "none"), ValueError, r"logp_reduction.*'mean'.*'none'"),
    ("backend", _set("backend", "cuda"), ValueError, r"backend.*'triton'.*'cuda'"),
    # dtypes and types
    ("logits-float64", _set("logits", lambda kw: kw["logits"].detach().double()), TypeError, r"logits.*float64"),
    ("logits-int", _set("logits", lambda kw: torch.zeros(B, T, V, dtype=torch.int32)), TypeError, r"logits.*int32"),
    ("logits-list", _set("logits", lambda kw: kw["logits"].tolist()), TypeError, r"logits.*list"),
    ("labels-float", _set("labels", lambda kw: kw["labels"].float()), TypeError, r"labels.*float32"),
    ("labels-int16", _set("labels", lambda kw: kw["labels"].to(torch.int16)), TypeError, r"labels.*int16"),
    ("rewards-int", _set("rewards", lambda kw: torch.zeros(B, B, dtype=torch.long)), TypeError, r"rewards.*int64"),
    ("ref_logps-bool", _set("ref_logps", lambda kw: torch.zeros(B, B, dtype=torch.bool)), TypeError,
     r"ref_logps.*bool"),
    ("rewards-list", _set("rewards", lambda kw: kw["rewards"].tolist()), TypeError, r"rewards"),
    # devices (meta tensors stand in for a second device on a CPU-only machine)
    ("rewards-device", _set("rewards", lambda kw: torch.empty(B, B, device="meta")), ValueError,
     r"rewards.*device.*cpu.*meta"),
    ("labels-device", _set("labels", lambda kw: torch.empty(B, T, dtype=torch.long, device="meta")), ValueError,
     r"labels.*device.*cpu.*meta"),
]


def snapshot(kw: dict) -> dict:
    return {k: v.detach().clone() for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def assert_untouched(kw: dict, before: dict) -> None:
    for k, old in before.items():
        new = kw[k]
        assert new.dtype == old.dtype and new.shape == old.shape, f"{k} changed dtype or shape"
        same = torch.equal(new.detach().reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8)) \
            if new.dtype.is_floating_point \
            else torch.equal(new.detach(), old)
        assert same, f"{k} was modified although the call raised"
        if k == "logits" and new.requires_grad:
            assert new.grad is None, "a gradient was written although the call raised"


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case,edit,exc,pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, edit, exc, pattern, backend, inplace):
    kw = valid_call()
    kw["backend"] = backend
    edit(kw)
    before = snapshot(kw)
    with pytest.raises(exc, match=pattern):
        fused_var_loss(**kw, inplace=inplace)
    assert_untouched(kw, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_impossible_row_is_an_error(backend):
    """A row of ref_logps that is −inf everywhere has Ẑ_i = 0: w_i is undefined, named as such."""
    kw = valid_call()
    kw["ref_logps"][1] = float("-inf")
    before = snapshot(kw)
    with pytest.raises(ValueError, match=r"ref_logps.*-inf"):
        fused_var_loss(**kw, backend=backend, inplace=True)
    assert_untouched(kw, before)


@pytest.mark.parametrize("form", ["matrix", "vector"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_ref_logps_accepted(backend, form):
    """docs/design.md §2: −inf in ref_logps is legal (an impossible response): weight 0, finite loss."""
    kw = valid_call()
    if form == "vector":
        kw["rewards"], kw["ref_logps"] = make_pairs(kw["labels"], form="vector")
        kw["ref_logps"][0] = float("-inf")
    else:
        kw["ref_logps"][0, 0] = float("-inf")
        kw["ref_logps"][2, 1] = float("-inf")
    out = fused_var_loss(**kw, backend=backend, return_aux=True)
    assert float(out.weights[0]) == 0.0
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.weights).all())
    out.loss.backward()
    assert bool(torch.isfinite(kw["logits"].grad).all())


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
def test_triton_on_cpu_without_interpreter(monkeypatch, inplace):
    """backend="triton" on CPU tensors outside the interpreter: a clear error, nothing touched."""
    kw = valid_call()
    before = snapshot(kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton'.*cpu.*TRITON_INTERPRET=1"):
        fused_var_loss(**kw, backend="triton", inplace=inplace)
    monkeypatch.undo()
    assert_untouched(kw, before)
    fused_var_loss(**kw, backend="triton").backward()  # the interpreter is back for the next tests


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_overflow_error_touches_nothing(backend):
    """The FloatingPointError of overflowing importance weights is raised before the kernel runs."""
    kw = valid_call()
    kw["ref_logps"] = torch.full((B, B), -500.0)
    before = snapshot(kw)
    with pytest.raises(FloatingPointError, match=r"(?s)importance.*logp_reduction='mean'.*weighting='posterior'"):
        fused_var_loss(**kw, weighting="importance", logp_reduction="sum", backend=backend, inplace=True)
    assert_untouched(kw, before)


def test_valid_edge_values_accepted():
    """The boundaries of what is legal: ignore_index inside the labels, labels 0 and V − 1, B = 1."""
    labels = torch.tensor([[IGNORE_INDEX, 0, V - 1, IGNORE_INDEX]])
    logits = torch.randn(1, 4, V, requires_grad=True)
    loss = fused_var_loss(logits, labels, torch.tensor([0.3]), torch.tensor([-1.0]), backend="torch",
                          beta=1e-3, temperature=1e-2, softcap=1e-1)
    loss.backward()
    assert bool(torch.isfinite(logits.grad).all())


# The same bad inputs against the fused-linear loss and the log-prob primitives. The logits of the
# valid call stand in for hidden states (H = V), with a weight [V, H]; the log-prob primitives take
# no rewards, so the cases about rewards, ref_logps and the VAR options do not apply to them.
_VAR_ONLY = ("rewards", "ref_logps", "mixed-forms", "beta", "weighting", "logp_reduction")
OTHER_FORMS = ["fused_linear_var_loss", "sequence_logps", "linear_sequence_logps"]


def _call_form(form: str, kw: dict):
    import varkernels

    kw = dict(kw)
    x = kw.pop("logits")
    if form == "sequence_logps":
        return varkernels.sequence_logps(x, **kw)
    weight = torch.eye(V, dtype=torch.float32).requires_grad_()
    if form == "fused_linear_var_loss":
        return varkernels.fused_linear_var_loss(x, weight, kw.pop("labels"), kw.pop("rewards"), kw.pop("ref_logps"),
                                                **kw)
    return varkernels.linear_sequence_logps(x, weight, kw.pop("labels"), **kw)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("form", OTHER_FORMS)
@pytest.mark.parametrize("case,edit,exc,pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_other_forms(case, edit, exc, pattern, form, backend):
    if form != "fused_linear_var_loss" and case.startswith(_VAR_ONLY):
        pytest.skip(f"{form} takes no rewards, ref_logps or VAR options")
    kw = valid_call()
    if form != "fused_linear_var_loss":
        kw.pop("rewards"), kw.pop("ref_logps")
    kw["backend"] = backend
    edit(kw)
    before = snapshot(kw)
    if form.startswith("linear") or form.startswith("fused_linear"):
        pattern = pattern.replace("logits", "hidden")
    with pytest.raises(exc, match=pattern):
        _call_form(form, kw)
    assert_untouched(kw, before)


# Inputs on the meta device (shapes without data, e.g. to size a step before allocating it): the data
# checks are skipped, as for fake tensors, and every output has its shape and dtype.
META_FORMS = ["fused_var_loss", "fused_linear_var_loss", "weighted_nll", "linear_weighted_nll", "sequence_logps",
              "linear_sequence_logps"]


@pytest.mark.parametrize("form", META_FORMS)
def test_meta_inputs(form):
    import varkernels

    m = dict(device="meta")
    H = 8
    x = torch.empty(B, T, H if "linear" in form else V, requires_grad=True, **m)
    weight = torch.empty(V, H, requires_grad=True, **m)
    labels = torch.empty(B, T, dtype=torch.long, **m)
    pairs = (torch.empty(B, B, **m), torch.empty(B, B, **m))
    head = (weight,) if "linear" in form else ()
    extra = {"fused_var_loss": pairs, "fused_linear_var_loss": pairs, "weighted_nll": (torch.empty(B, T, **m),),
             "linear_weighted_nll": (torch.empty(B, **m),)}.get(form, ())
    fn = getattr(varkernels, form)
    if "logps" in form:
        out = fn(x, *head, labels, reduction="none")
        assert out.shape == (B, T) and out.dtype == torch.float32 and out.device.type == "meta"
        out = fn(x, *head, labels)
        assert out.shape == (B,)
        loss = out.sum()
    else:
        out = fn(x, *head, labels, *extra, return_aux=True)
        loss = out.loss
        assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "meta"
        assert out.policy_logps.shape == (B,)
        if form.endswith("var_loss"):
            assert out.weights.shape == out.log_z.shape == (B,) and out.ess.shape == ()
    loss.backward()
    assert x.grad.shape == x.shape and x.grad.dtype == x.dtype and x.grad.device.type == "meta"
    if head:
        assert weight.grad.shape == weight.shape
