"""The benchmark's VAR-on-PyTorch's-linear_cross_entropy provider computes the VAR loss (docs/design.md §1).

tools/peers.py builds VAR on ``torch.nn.functional.linear_cross_entropy(h, W, y,
reduction="none", options=torch.nn.LinearCrossEntropyOptions())`` (PyTorch's chunked path):
per-token −lp → masked mean per sequence → posterior weights → loss. Its loss and the gradients
of hidden and weight must match ``varkernels.reference.linear_var_loss_reference`` under the
tolerance policy of ``helpers.assert_close`` (error vs a float64 truth ≤ 2 × PyTorch's own error
in the same dtype), so that the timed rows of bench_peers.py compare like with like.

One documented exception, a property of the peer and not of the test: in bf16 its
``reduction="none"`` output, the per-token loss, is a bf16 tensor, so each token's −lp is rounded
to 8 significant bits (relative error ≤ u = 2⁻⁸) before the VAR reduction sees it; the loss then
carries Σ_k a_k·u·|lp_k| more error than PyTorch's eager reference (fp32 log-softmax over the
bf16 logits), 2.6-30× PyTorch's error at this shape (seeds 0-3). The bf16 loss is checked against that derived
bound; its gradients (computed inside the op, not from the rounded output) meet the policy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, lp_atol

from varkernels.reference import linear_var_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

NAME = "torch[linear_cross_entropy]"


def _provider():
    from tools.peers import get_providers

    providers = {p.name: p for p in get_providers("linear", "cpu")}
    p = providers.get(NAME)
    if p is None or not p.runnable:
        pytest.skip(f"{NAME} cannot run here: {p.skip if p else 'not a provider of tools/peers.py'}")
    return p


def _reference(x, float64: bool):
    h, w = x.hidden.detach().clone(), x.weight.detach().clone()
    r, q = x.rewards, x.ref_logps
    if float64:
        h, w, r, q = h.double(), w.double(), r.double(), q.double()
    h.requires_grad_(True)
    w.requires_grad_(True)
    out = linear_var_loss_reference(h, w, x.labels, r, q, return_aux=True)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_peer_matches_reference(dtype, one_torch_thread):
    from tools.peers import make_inputs

    p = _provider()
    # N = B·T = 48 token rows ≥ H = 16 and V > H: the shapes where PyTorch's chunked path applies
    x = make_inputs("linear", 3, 16, 1000, dtype, H=16, seed=3)
    loss = p.loss(x)
    loss.backward()
    ref, ref_gh, ref_gw = _reference(x, float64=False)
    truth, truth_gh, truth_gw = _reference(x, float64=True)
    B = x.labels.shape[0]
    mask = x.labels != -100
    n = mask.sum(-1, keepdim=True).clamp(min=1).double()
    a = truth.weights.double().unsqueeze(1) / (B * n) * mask  # the loss is −Σ_k a_k·lp_k
    floor = lp_atol(a.sum(-1))  # one a_i per sequence with the "mean" reduction (helpers.lp_atol)
    if dtype == torch.bfloat16:  # the bf16 per-token output: Σ_k a_k·u·|lp_k| on top (module docstring)
        lp = torch.log_softmax(x.hidden.detach().double() @ x.weight.detach().double().T, -1)
        lp = lp.gather(-1, x.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        floor += float((a * lp.abs()).sum()) * 2.0**-8
    assert_close(loss.detach().float(), ref.loss, truth.loss, name=f"{NAME} loss", atol_floor=floor)
    assert x.hidden.grad.dtype == dtype and x.weight.grad.dtype == dtype
    assert_close(x.hidden.grad, ref_gh, truth_gh, name=f"{NAME} hidden grad")
    assert_close(x.weight.grad, ref_gw, truth_gw, name=f"{NAME} weight grad")


def test_provider_selection_by_exact_name_or_substring():
    """bench_peers.py --providers: "naive" selects naive only; "varkernels" every varkernels backend."""
    from tools.peers import selected as _selected

    names = ["naive", "torch.compile(naive)", "varkernels[cpu]", "varkernels[torch]", NAME]
    picked = [n for n in names if _selected(n, ["naive", "varkernels", "linear_cross_entropy"], names)]
    assert picked == ["naive", "varkernels[cpu]", "varkernels[torch]", NAME]
    assert [n for n in names if _selected(n, None, names)] == names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["trl[chunked_logprob]", "varkernels[logps]"])
def test_log_prob_head_peers_match_reference(name, dtype, one_torch_thread):
    """VAR on TRL's chunked log-prob head and on varkernels' linear_sequence_logps: loss and gradients
    within the tolerance policy of the reference (both return fp32 per-token log-probs)."""
    from tools.peers import get_providers, make_inputs

    p = {q.name: q for q in get_providers("linear", "cpu")}[name]
    if not p.runnable:
        pytest.skip(f"{name} cannot run here: {p.skip}")
    x = make_inputs("linear", 3, 16, 1000, dtype, H=16, seed=4)
    loss = p.loss(x)
    loss.backward()
    ref, ref_gh, ref_gw = _reference(x, float64=False)
    truth, truth_gh, truth_gw = _reference(x, float64=True)
    B = x.labels.shape[0]
    mask = x.labels != -100
    n = mask.sum(-1, keepdim=True).clamp(min=1).double()
    floor = lp_atol((truth.weights.double().unsqueeze(1) / (B * n) * mask).sum(-1))
    assert_close(loss.detach().float(), ref.loss, truth.loss, name=f"{name} loss", atol_floor=floor)
    assert x.hidden.grad.dtype == dtype and x.weight.grad.dtype == dtype
    assert_close(x.hidden.grad, ref_gh, truth_gh, name=f"{name} hidden grad")
    assert_close(x.weight.grad, ref_gw, truth_gw, name=f"{name} weight grad")


def test_traffic_part_runs_and_writes_its_estimates(tmp_path):
    """``bench_peers.py --part traffic --quick`` (the interpreter count, ~6 s) runs end to end and writes rows with a
    roofline estimate per GPU arch: it broke silently once when gpu_measures.GPUS changed shape."""
    import csv
    import os
    import subprocess

    pytest.importorskip("triton")
    out = tmp_path / "peers.csv"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peers.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(script), "--part", "traffic", "--quick", "--csv", str(out)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [row for row in csv.DictReader(out.open()) if row["part"] == "traffic" and row["status"] == "ok"]
    assert {row["provider"] for row in rows} >= {"naive", "varkernels[triton]"}
    assert all(float(row["est_us_sm_90"]) > 0 and float(row["est_us_sm_80"]) > float(row["est_us_sm_90"])
               for row in rows)
