"""The public ``varkernels.var_weights`` (varkernels/weights.py) against ``fused_var_loss``.

It is the ``weights`` field of ``fused_var_loss(..., return_aux=True)`` for every shape form of rewards /
ref_logps ([B, B], [B], [k, B, B], [k, B]) and weighting, and VAR as a weighted NLL:
``weighted_nll(logits, labels, var_weights(R, Q))`` is ``fused_var_loss(logits, labels, R, Q)``. Both run
the same code (the weights, then the token op with the same coefficients), so they are compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_labels, make_logits, make_pairs

import varkernels
from varkernels import fused_var_loss, var_weights, weighted_nll

V, T = 40, 7
FORMS = {  # name: (k groups or None for the form without a group dim, cross-pair)
    "[B, B]": (None, True),
    "[B]": (None, False),
    "[k, B, B]": (3, True),
    "[k, B]": (3, False),
}


def group_inputs(form, B=4, logp_reduction="mean", seed=0):
    """(logits [k·B, T, V], labels, R, Q) of ``form``, k groups of B realistic pairs."""
    g = torch.Generator().manual_seed(seed)
    k, cross = FORMS[form]
    groups = k or 1
    labels = make_labels(groups * B, T, V, generator=g)
    logits = make_logits(groups * B, T, V, labels=labels, generator=g)
    pairs = [make_pairs(labels[i * B:(i + 1) * B], form="matrix" if cross else "vector",
                        logp_reduction=logp_reduction, generator=g) for i in range(groups)]
    R, Q = (torch.stack([p[j] for p in pairs]) for j in (0, 1))
    if k is None:
        R, Q = R[0], Q[0]
    return logits, labels, R, Q


@pytest.mark.parametrize("weighting", ["posterior", "importance"])
@pytest.mark.parametrize("form", list(FORMS))
def test_equals_the_weights_of_fused_var_loss(form, weighting):
    logits, labels, R, Q = group_inputs(form)
    for beta in (1.0, 0.3):
        aux = fused_var_loss(logits.detach(), labels, R, Q, beta=beta, weighting=weighting, return_aux=True)
        w = var_weights(R, Q, beta=beta, weighting=weighting)
        assert w.dtype == torch.float32 and w.shape == (labels.shape[0],) and not w.requires_grad
        torch.testing.assert_close(w, aux.weights, rtol=0, atol=0)
        if weighting == "posterior":  # w_i = B·softmax(A[i])[i] ∈ (0, B]
            B = R.shape[-1]
            assert bool((w > 0).all()) and bool((w <= B).all())
        if weighting == "posterior" and not FORMS[form][1]:  # one softmax per group: the weights sum to B
            torch.testing.assert_close(w.view(-1, B).sum(1), torch.full((w.numel() // B,), float(B)))


@pytest.mark.parametrize("form", list(FORMS))
def test_weighted_nll_of_var_weights_is_fused_var_loss(form):
    """Loss and logits gradient: the VAR loss is the weighted NLL at the VAR weights (same reduction)."""
    for logp_reduction in ("mean", "sum"):
        logits, labels, R, Q = group_inputs(form, logp_reduction=logp_reduction)
        a, b = logits.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
        opts = dict(shift_labels=True)
        var = fused_var_loss(a, labels, R, Q, beta=0.5, logp_reduction=logp_reduction, **opts)
        nll = weighted_nll(b, labels, var_weights(R, Q, beta=0.5), reduction=logp_reduction, **opts)
        var.backward()
        nll.backward()
        torch.testing.assert_close(nll, var, rtol=0, atol=0)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)


def test_torch_backend_and_requires_grad_inputs():
    _, _, R, Q = group_inputs("[k, B, B]")
    w = var_weights(R.requires_grad_(), Q, backend="torch")
    assert not w.requires_grad
    torch.testing.assert_close(w, var_weights(R.detach(), Q, backend="cpu"))


def test_square_shared_context_groups():
    """A square 2-D tensor is one cross-pair group [B, B]; groups=k reads it as k = B shared-context groups."""
    _, labels, R, Q = group_inputs("[k, B]", B=3)  # [3, 3]
    logits = make_logits(9, T, V, labels=make_labels(9, T, V)).detach()
    shared = var_weights(R, Q, groups=3)
    torch.testing.assert_close(shared, fused_var_loss(logits, make_labels(9, T, V), R, Q, return_aux=True).weights)
    cross = var_weights(R, Q)
    assert cross.shape == (3,)
    torch.testing.assert_close(cross, fused_var_loss(logits[:3], labels[:3], R, Q, return_aux=True).weights)


def test_bad_inputs_raise_like_fused_var_loss():
    _, _, R, Q = group_inputs("[k, B]")
    with pytest.raises(ValueError, match="ref_logps must have shape"):
        var_weights(R, Q[:, :2])
    with pytest.raises(ValueError, match="weighting"):
        var_weights(R, Q, weighting="softmax")
    with pytest.raises(ValueError, match="beta"):
        var_weights(R, Q, beta=0.0)
    with pytest.raises(ValueError, match="rewards must be finite"):
        var_weights(R.clone().index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"))), Q)
    with pytest.raises(ValueError, match="rewards must have shape"):
        var_weights(R.view(3, 2, 2, 1), Q)
    with pytest.raises(ValueError, match="k = 2 groups"):
        var_weights(R, Q, groups=2)
    with pytest.raises(TypeError, match="rewards"):
        var_weights(R.long(), Q)
    with pytest.raises(FloatingPointError, match="not finite"):
        var_weights(torch.tensor([200.0, 0.0]), torch.tensor([-1e4, -1e4]), weighting="importance")


def test_exported():
    assert "var_weights" in varkernels.__all__ and varkernels.var_weights is var_weights
