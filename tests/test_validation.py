"""Bad input to ``fused_var_loss`` (docs/design.md §2): a ValueError / TypeError that names the argument,
raised before anything of the caller's is touched — also with ``inplace=True``.
"""

from __future__ import annotations

import pytest
import torch
from bad_inputs import BAD_INPUTS, B, T, V, assert_untouched, snapshot, valid_call
from helpers import IGNORE_INDEX, make_pairs, require_backend

from varkernels import fused_var_loss

# Validation (varkernels/_prepare.py: prepare_call) runs before the backend's kernels, so each bad input is
# checked once, on the torch backend, with inplace=True (the logits would be overwritten if anything ran);
# test_validation_runs_before_dispatch shows that on every backend no kernel is reached.


@pytest.mark.parametrize("case,edit,exc,pattern", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, edit, exc, pattern):
    kw = valid_call()
    kw["backend"] = "torch"
    edit(kw)
    before = snapshot(kw)
    with pytest.raises(exc, match=pattern):
        fused_var_loss(**kw, inplace=True)
    assert_untouched(kw, before)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_validation_runs_before_dispatch(monkeypatch, backend):
    """Every bad input raises its error on every backend before the VAR weights or the token kernel run:
    both are replaced by a function that fails the test if it is reached."""
    require_backend(backend)
    from varkernels.var import loss as var_loss

    def dispatched(*args, **kwargs):
        raise AssertionError(f"a kernel was reached on backend={backend!r} although the input is bad")

    monkeypatch.setattr(var_loss, "_var_weights", dispatched)
    monkeypatch.setattr(var_loss, "token_forward", dispatched)
    with pytest.raises(AssertionError, match="a kernel was reached"):  # the spies are the ones called
        fused_var_loss(**valid_call(), backend=backend)
    for case, edit, exc, pattern in BAD_INPUTS:
        kw = valid_call()
        kw["backend"] = backend
        edit(kw)
        before = snapshot(kw)
        try:
            with pytest.raises(exc, match=pattern):
                fused_var_loss(**kw, inplace=True)
        except (AssertionError, pytest.fail.Exception) as error:  # name the case that failed
            raise AssertionError(f"case {case!r}, backend={backend!r}: {error}") from error
        assert_untouched(kw, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_ref_logps_accepted_vector_form(backend):
    """docs/design.md §2: −inf in ref_logps is legal (an impossible response): weight 0, finite loss. The
    (B,) form here; the (B, B) form with a parity check is tests/test_var_loss.py::test_minus_inf_ref_logps."""
    kw = valid_call()
    kw["rewards"], kw["ref_logps"] = make_pairs(kw["labels"], form="vector")
    kw["ref_logps"][0] = float("-inf")
    out = fused_var_loss(**kw, backend=backend, return_aux=True)
    assert float(out.weights[0]) == 0.0
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.weights).all())
    out.loss.backward()
    assert bool(torch.isfinite(kw["logits"].grad).all())


def test_triton_on_cpu_without_interpreter(monkeypatch):
    """backend="triton" on CPU tensors outside the interpreter: a clear error, nothing touched (inplace=True)."""
    inplace = True
    kw = valid_call()
    before = snapshot(kw)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton'.*cpu.*TRITON_INTERPRET=1"):
        fused_var_loss(**kw, backend="triton", inplace=inplace)
    monkeypatch.undo()
    assert_untouched(kw, before)
    fused_var_loss(**kw, backend="triton").backward()  # the interpreter is back for the next tests


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


OTHER_FORM_CASES = [(form, *case) for form in OTHER_FORMS for case in BAD_INPUTS
                    if form == "fused_linear_var_loss" or not case[0].startswith(_VAR_ONLY)]


@pytest.mark.parametrize("form,case,edit,exc,pattern", OTHER_FORM_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in OTHER_FORM_CASES])
def test_bad_input_other_forms(form, case, edit, exc, pattern):
    kw = valid_call()
    if form != "fused_linear_var_loss":
        kw.pop("rewards"), kw.pop("ref_logps")
    kw["backend"] = "torch"  # validation runs before dispatch (test_validation_runs_before_dispatch)
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
