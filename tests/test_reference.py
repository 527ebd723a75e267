"""Sanity of ``varkernels.reference`` itself against values computed by hand (docs/design.md §1).

Every kernel is tested against the reference, so the reference is tested against arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import IGNORE_INDEX, make_labels, make_logits, make_pairs

from varkernels.reference import (
    ess,
    sequence_logps_reference,
    token_logps_reference,
    transform_logits,
    var_loss_reference,
    var_weights_reference,
)

F64 = torch.float64


def logsumexp(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def test_hand_computed_loss_matrix_form():
    """B = 2, T = 3, V = 3, (B, B) pairs, "mean", posterior: every step of docs/design.md §1 by hand."""
    logits = torch.tensor(
        [[[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 2.0, 2.0]],
         [[-1.0, 0.0, 1.0], [3.0, 1.0, -2.0], [0.0, 0.0, 4.0]]], dtype=F64, requires_grad=True,
    )
    labels = torch.tensor([[IGNORE_INDEX, 0, 2], [1, 0, IGNORE_INDEX]])
    R = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=F64)
    Q = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], dtype=F64)
    beta = 0.5
    rows = logits.detach().tolist()

    def lp(i, t):
        return rows[i][t][labels[i, t].item()] - logsumexp(rows[i][t])

    s = [(lp(0, 1) + lp(0, 2)) / 2, (lp(1, 0) + lp(1, 1)) / 2]
    A = [[R[i, j].item() / beta + Q[i, j].item() for j in range(2)] for i in range(2)]
    log_z = [logsumexp(A[i]) - math.log(2) for i in range(2)]
    w = [math.exp(A[i][i] - log_z[i]) for i in range(2)]
    loss = -(w[0] * s[0] + w[1] * s[1]) / 2

    out = var_loss_reference(logits, labels, R, Q, beta=beta, return_aux=True)
    torch.testing.assert_close(out.loss, torch.tensor(loss, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.weights, torch.tensor(w, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.log_z, torch.tensor(log_z, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.policy_logps, torch.tensor(s, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.ess, torch.tensor(sum(w) ** 2 / (w[0] ** 2 + w[1] ** 2), dtype=F64))

    # docs/design.md §1 closed form of the gradient: −(w_i/B)·c_i·(onehot(y) − softmax) at non-ignored tokens
    out.loss.backward()
    expected = torch.zeros_like(logits)
    for i in range(2):
        n = int((labels[i] != IGNORE_INDEX).sum())
        for t in range(3):
            if labels[i, t] == IGNORE_INDEX:
                continue
            p = torch.softmax(logits.detach()[i, t], dim=-1)
            onehot = torch.nn.functional.one_hot(labels[i, t], 3).to(F64)
            expected[i, t] = -(w[i] / 2) * (1.0 / n) * (onehot - p)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-15)


def test_hand_computed_importance_and_sum():
    """weighting="importance": log w_i = R[i, i]/β − log Ẑ_i; "sum" reduction: s_i = Σ_t lp."""
    logits = torch.tensor([[[0.0, 1.0], [2.0, -1.0]], [[1.0, 1.0], [0.0, 3.0]]], dtype=F64)
    labels = torch.tensor([[1, 0], [0, IGNORE_INDEX]])
    R = torch.tensor([[0.5, 1.5], [-1.0, 0.0]], dtype=F64)
    Q = torch.tensor([[-3.0, -4.0], [-2.5, -1.0]], dtype=F64)
    A = (R + Q).tolist()
    log_z = [logsumexp(A[i]) - math.log(2) for i in range(2)]
    w = [math.exp(R[i, i].item() - log_z[i]) for i in range(2)]
    s0 = (1.0 - logsumexp([0.0, 1.0])) + (2.0 - logsumexp([2.0, -1.0]))
    s1 = 1.0 - logsumexp([1.0, 1.0])
    out = var_loss_reference(logits, labels, R, Q, weighting="importance", logp_reduction="sum", return_aux=True)
    torch.testing.assert_close(out.weights, torch.tensor(w, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.policy_logps, torch.tensor([s0, s1], dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, torch.tensor(-(w[0] * s0 + w[1] * s1) / 2, dtype=F64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("weighting", ["posterior", "importance"])
@pytest.mark.parametrize("form", ["matrix", "vector"])
def test_batch_of_one(form, weighting):
    """B = 1: Ẑ = π_ref·e^{R/β}, so the posterior weight is exactly 1 (importance: e^{−Q})."""
    shape = (1, 1) if form == "matrix" else (1,)
    R, Q = torch.full(shape, 2.7), torch.full(shape, -3.1)
    w, log_z = var_weights_reference(R, Q, beta=0.3, weighting=weighting)
    assert float(log_z) == pytest.approx(2.7 / 0.3 - 3.1, rel=1e-6)
    if weighting == "posterior":
        assert float(w) == 1.0  # exactly: A − (A + log 1 − log 1)
        assert float(ess(w)) == 1.0
    else:
        assert float(w) == pytest.approx(math.exp(3.1), rel=1e-6)


@pytest.mark.parametrize("weighting", ["posterior", "importance"])
def test_shared_form_is_matrix_of_identical_rows(weighting):
    """(B,) R, Q stand for the (B, B) matrices whose every row is the vector."""
    B = 5
    R, Q = torch.randn(B), -torch.rand(B) * 3
    w_vec, z_vec = var_weights_reference(R, Q, beta=0.7, weighting=weighting)
    w_mat, z_mat = var_weights_reference(R.expand(B, B).clone(), Q.expand(B, B).clone(), beta=0.7, weighting=weighting)
    torch.testing.assert_close(w_vec, w_mat, rtol=0, atol=0)
    torch.testing.assert_close(z_vec, z_mat, rtol=0, atol=0)
    assert bool((z_vec == z_vec[0]).all()), "Ẑ of the shared form is the same for every row"
    if weighting == "posterior":  # B·softmax(A) over the batch: sums to B
        torch.testing.assert_close(w_vec, B * torch.softmax(R / 0.7 + Q, dim=0))
        assert float(w_vec.sum()) == pytest.approx(B, rel=1e-6)


@pytest.mark.parametrize("logp_reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=str)
def test_empty_response_row(dtype, logp_reduction):
    """n_i = 0: s_i = 0 and a zero gradient row, never NaN (also for "mean": 0/0 is avoided)."""
    B, T, V = 3, 6, 40
    labels = make_labels(B, T, V, ignored_rows=(1,))
    logits = make_logits(B, T, V, dtype)
    R, Q = make_pairs(labels, logp_reduction=logp_reduction)
    out = var_loss_reference(logits, labels, R, Q, logp_reduction=logp_reduction, return_aux=True)
    out.loss.backward()
    assert float(out.policy_logps[1]) == 0.0
    assert bool((logits.grad[1] == 0).all())
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(logits.grad).all())
    assert out.loss.dtype == (F64 if dtype == F64 else torch.float32)


def test_all_rows_empty():
    labels = torch.full((2, 4), IGNORE_INDEX)
    logits = torch.randn(2, 4, 10, requires_grad=True)
    loss = var_loss_reference(logits, labels, torch.zeros(2), torch.zeros(2))
    loss.backward()
    assert float(loss.detach()) == 0.0 and bool((logits.grad == 0).all())


def test_ess_bounds():
    """ess = (Σw)²/Σw² ∈ [1, B]: B for equal weights, → 1 when one example dominates."""
    B = 8
    assert float(ess(torch.ones(B))) == pytest.approx(B)
    assert float(ess(torch.tensor([1.0] + [0.0] * (B - 1)))) == pytest.approx(1.0)
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        R, Q = torch.randn(B, B, generator=g) * 3, -torch.rand(B, B, generator=g) * 20
        for weighting in ("posterior", "importance"):
            w, _ = var_weights_reference(R, Q, beta=0.5, weighting=weighting)
            e = float(ess(w))
            assert 1.0 - 1e-6 <= e <= B + 1e-6, (weighting, e)
            if weighting == "posterior":
                assert bool(((w > 0) & (w <= B * (1 + 1e-6))).all()), "posterior weights lie in (0, B]"


def test_minus_inf_ref_logp_gives_zero_weight():
    """−inf in Q: an impossible response gets weight 0 and leaves the others finite."""
    R = torch.zeros(3, 3)
    Q = torch.tensor([[float("-inf"), -1.0, -2.0], [-1.0, -1.0, float("-inf")], [-3.0, -1.0, -0.5]])
    w, log_z = var_weights_reference(R, Q)
    assert float(w[0]) == 0.0
    assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(log_z).all())
    w_vec, _ = var_weights_reference(torch.zeros(3), torch.tensor([-1.0, float("-inf"), -2.0]))
    assert float(w_vec[1]) == 0.0 and float(w_vec.sum()) == pytest.approx(3.0)


def test_importance_overflow_raises_with_remedies():
    """docs/design.md §1.5: summed ref log-probs make exp(R/β − log Ẑ) overflow; the error names the remedies."""
    R, Q = torch.zeros(4, 4), torch.full((4, 4), -300.0)
    with pytest.raises(FloatingPointError, match=r"(?s)logp_reduction='mean'.*weighting='posterior'"):
        var_weights_reference(R, Q, weighting="importance")
    w, _ = var_weights_reference(R, Q, weighting="posterior")  # bounded: the same inputs are fine
    torch.testing.assert_close(w, torch.ones(4))


def test_weights_are_stop_gradient():
    """Gradient flows only into the policy: R and Q are constants (docs/design.md §1.6)."""
    labels = make_labels(3, 4, 20)
    logits = make_logits(3, 4, 20)
    R, Q = make_pairs(labels)
    R.requires_grad_(True)
    Q.requires_grad_(True)
    var_loss_reference(logits, labels, R, Q).backward()
    assert R.grad is None and Q.grad is None and logits.grad is not None


def test_transform_order_softcap_then_temperature():
    """docs/design.md §1.1: c·tanh(ℓ/c) first, then /τ (the other order gives a different value)."""
    x = torch.tensor([-40.0, -3.0, 0.5, 25.0], dtype=F64)
    c, tau = 10.0, 0.5
    torch.testing.assert_close(transform_logits(x, softcap=c, temperature=tau), c * torch.tanh(x / c) / tau)
    assert not torch.allclose(transform_logits(x, softcap=c, temperature=tau), c * torch.tanh(x / tau / c))
    torch.testing.assert_close(transform_logits(x), x, rtol=0, atol=0)


def test_shift_labels_is_the_hf_causal_shift():
    """shift_labels=True: position t predicts labels[:, t+1]; the last position predicts nothing."""
    B, T, V = 2, 6, 30
    logits = torch.randn(B, T, V, dtype=F64)
    labels = make_labels(B, T, V)
    lp, mask = token_logps_reference(logits, labels, shift_labels=True)
    lp_manual, mask_manual = token_logps_reference(logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(lp[:, :-1], lp_manual, rtol=0, atol=0)
    assert bool((lp[:, -1] == 0).all()) and not bool(mask[:, -1].any())
    assert torch.equal(mask[:, :-1], mask_manual)


def test_sequence_reductions():
    """"sum" = Σ_t lp over non-ignored tokens; "mean" = that / n_i; "none" = the [B, T] token log-probs."""
    B, T, V = 3, 7, 25
    logits = torch.randn(B, T, V, dtype=F64)
    labels = make_labels(B, T, V, ignored_rows=(2,))
    lp = sequence_logps_reference(logits, labels, reduction="none")
    n = (labels != IGNORE_INDEX).sum(1)
    full = torch.log_softmax(logits, -1)
    for i in range(B):
        expect = sum(full[i, t, labels[i, t]].item() for t in range(T) if labels[i, t] != IGNORE_INDEX)
        assert float(lp[i].sum()) == pytest.approx(expect, rel=1e-12, abs=0)
    s_sum = sequence_logps_reference(logits, labels, reduction="sum")
    s_mean = sequence_logps_reference(logits, labels, reduction="mean")
    torch.testing.assert_close(s_sum, lp.sum(1))
    torch.testing.assert_close(s_mean[:2], s_sum[:2] / n[:2].to(F64))
    assert float(s_mean[2]) == 0.0 and float(s_sum[2]) == 0.0


def test_low_precision_inputs_compute_in_float32():
    """bf16/fp16 logits are upcast: the reference loss equals the float32 loss of the same values."""
    labels = make_labels(2, 5, 50)
    logits = make_logits(2, 5, 50, torch.bfloat16, requires_grad=False)
    R, Q = make_pairs(labels)
    a = var_loss_reference(logits, labels, R, Q)
    b = var_loss_reference(logits.float(), labels, R, Q)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
