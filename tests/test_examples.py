"""examples/compare_methods.py: the --quick run trains every method of both suites (the ablation; the
frontier with TRL's GRPO and online VAR), its frontier rows equal the committed quick rows
(benchmarks/results/alignment_frontier_quick.csv: the next drift of the frontier shows), and its DPO on
linear_sequence_logps equals DPO computed from the model's logits."""

import copy
import csv
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
pytest.importorskip("trl", reason="compare_methods.py runs TRL's DPOTrainer (the test extra installs trl)")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
QUICK_ROWS = ROOT / "benchmarks" / "results" / "alignment_frontier_quick.csv"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cm():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("compare_methods")
    finally:
        sys.path.remove(str(EXAMPLES))


def run_quick(out: Path, suite: str) -> None:
    """``compare_methods.py --quick --suite SUITE --out OUT`` in a subprocess (one torch thread, its default)."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "compare_methods.py"), "--quick", "--suite", suite, "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def frontier_quick(tmp_path_factory) -> Path:
    """The folder of one ``--quick --suite frontier`` run (about 1 CPU-minute), shared by the tests below."""
    out = tmp_path_factory.mktemp("frontier-quick")
    run_quick(out, "frontier")
    return out


@pytest.mark.slow  # ~30 s of training every method end to end: CI runs it with -m slow
def test_compare_methods_quick(tmp_path):
    """Every method trains; one row per setting; trained policies moved away from the reference and
    gained reward; the DPO cross-check ran; the plot exists. Output goes to tmp_path only."""
    run_quick(tmp_path, "ablation")
    with open(tmp_path / "alignment.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "alignment.png").stat().st_size > 0
    for col in ("method", "weighting", "B", "form", "seed", "reward", "kl", "seconds"):
        assert col in rows[0], col
    assert {r["method"] for r in rows} == {"reference", "sft", "dpo", "var"}
    var = {(r["weighting"], r["B"], r["form"], r["reduction"]) for r in rows if r["method"] == "var"}
    expected = {(w, str(b), f, "mean") for w in ("posterior", "importance") for b in (2, 4, 8)
                for f in ("cross", "shared", "per-prompt")}
    assert expected <= var
    assert len(rows) == 3 + len(var)  # one seed: one row per setting
    ref = next(r for r in rows if r["method"] == "reference")
    assert float(ref["kl"]) == 0.0
    trained = [r for r in rows if r["method"] != "reference" and r["status"] == "ok"]
    assert all(r["status"] == "ok" for r in rows if r["reduction"] != "sum"), [r["status"] for r in rows]
    for r in trained:
        assert 0.0 <= float(r["reward"]) <= 1.0 and float(r["seconds"]) > 0
        assert float(r["kl"]) > 0.05, r  # training moved the policy
    gain = {m: [float(r["reward"]) - float(ref["reward"]) for r in trained if r["method"] == m]
            for m in ("sft", "dpo", "var")}
    # on 128 held-out prompts the standard error of a mean reward is about 0.02
    assert min(gain["sft"]) > 0.1 and min(gain["dpo"]) > 0.1, gain
    assert sum(gain["var"]) / len(gain["var"]) > 0.05, gain
    dpo = next(r for r in rows if r["method"] == "dpo")
    assert float(dpo["dpo_check_loss_abs"]) < 1e-5 and float(dpo["dpo_check_grad_rel"]) < 1e-4


@pytest.mark.slow  # shares the ~1 CPU-minute --quick frontier run with the drift test below
def test_frontier_quick(frontier_quick):
    """The frontier suite of a --quick run: every method (TRL's GRPO and online VAR in both reference
    modes, token-summed and centred included) at every setting of its knob, the online methods at both
    learning rates, one sweep row per offline method, the time split of the online methods adding up,
    the plots written."""
    out = frontier_quick
    with open(out / "alignment_frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert (out / "alignment_frontier.png").stat().st_size > 0 and (out / "alignment_time.png").stat().st_size > 0
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    front = [r for r in rows if r["stage"] == "frontier"]
    got = {(r["method"], r["variant"]) for r in front}
    assert {("grpo", ""), ("var-online", "policy"), ("var-online", "initial"), ("var-online", "initial sum"),
            ("var-online", "initial centred"), ("sft", ""), ("dpo", ""), ("var", "per-prompt B=8"),
            ("reference", "")} == got
    grpo = [(float(r["value"]), float(r["lr"])) for r in front if r["method"] == "grpo"]
    assert sorted(grpo) == sorted((v, lr) for v in (0.0, 0.1, 0.3, 1.0) for lr in (1e-3, 3e-3))  # one seed
    centred = sorted((float(r["value"]), float(r["lr"])) for r in front if r["variant"] == "initial centred")
    assert centred == sorted((v, lr) for v in (0.01, 0.03, 0.1) for lr in (1e-3, 3e-3))
    sweep = [r for r in rows if r["stage"] == "lr-sweep"]
    assert sorted(r["method"] for r in sweep) == ["dpo", "sft", "var"]  # one learning rate per method in --quick
    assert {r["revision"] for r in rows} != {""}
    ref = next(float(r["reward"]) for r in front if r["method"] == "reference")
    for r in front:
        if r["method"] in ("grpo", "var-online"):
            parts = float(r["gen_seconds"]) + float(r["score_seconds"]) + float(r["train_seconds"])
            assert abs(parts - float(r["seconds"])) < 1e-6 and float(r["gen_seconds"]) > 0, r
            assert len(r["curve"].split(";")) >= 1 and float(r["kl"]) > 0.05, r
    best_online = max(float(r["reward"]) for r in front if r["method"] == "var-online")
    assert best_online > ref + 0.05, (best_online, ref)  # 8 steps of online VAR already help


def test_moved_rows_names_the_row_that_moved(cm):
    """The drift check names each row that moved, what moved, and rows that appeared or went."""
    rows = [{"stage": "frontier", "method": "grpo", "variant": "", "knob": "kl_coef", "value": str(v), "lr": "0.003",
             "seed": "0", "status": "ok", "reward": "0.5", "kl": "1.25", "val_reward": ""} for v in (0.0, 0.1)]
    assert cm.moved_rows(rows, copy.deepcopy(rows)) == []
    fresh = copy.deepcopy(rows)
    fresh[1]["kl"] = "1.2500000000000002"
    fresh.append({**rows[0], "method": "var-online", "variant": "initial centred", "knob": "beta"})
    assert cm.moved_rows(rows, fresh) == [
        "stage=frontier method=grpo knob=kl_coef value=0.1 lr=0.003 seed=0: kl 1.25 -> 1.2500000000000002",
        "stage=frontier method=var-online variant=initial centred knob=beta value=0.0 lr=0.003 seed=0: only in the "
        "new rows",
    ]
    assert cm.moved_rows(fresh, rows)[-1].endswith("only in the committed rows")


@pytest.mark.slow
def test_frontier_quick_rows_match_committed(cm, frontier_quick):
    """A --quick frontier run reproduces the committed quick rows exactly (reward, KL, validation reward and
    status of every row). When a change moves them on purpose, regenerate the file with the command in
    docs/alignment.md ("Drift") and say so in the commit; otherwise the named rows show what moved."""
    with open(QUICK_ROWS, newline="") as f:
        committed = list(csv.DictReader(f))
    with open(frontier_quick / "alignment_frontier.csv", newline="") as f:
        fresh = list(csv.DictReader(f))
    versions = {k: (committed[0][k], fresh[0][k]) for k in ("torch", "transformers", "trl")}
    if any(a != b for a, b in versions.values()):
        pytest.skip(f"the committed quick rows are from other library versions (committed, here): {versions}")
    from varkernels._backend import cpu_extension_available

    if not cpu_extension_available():
        pytest.skip("the committed quick rows ran the C++ CPU kernel, which is not built here")
    moved = cm.moved_rows(committed, fresh)
    assert not moved, (f"{len(moved)} of {len(committed)} quick frontier rows moved since revision "
                       f"{committed[0]['revision']}:\n" + "\n".join(moved))


def _logits_dpo(policy, reference, batch, beta, dtype=torch.float32):
    """DPO's sigmoid loss from full logits (log_softmax + gather) in ``dtype``, the plain reference."""
    ids, comp = batch["input_ids"], batch["completion_mask"]

    def logps(model):
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].to(dtype)
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (lp * comp[:, 1:]).sum(-1)

    c, r = logps(policy).chunk(2)
    with torch.no_grad():
        rc, rr = logps(reference).chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((c - rc) - (r - rr))).mean()


def test_dpo_on_linear_sequence_logps_matches_logits(cm):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    torch.manual_seed(0)
    policy = cm.tiny_llama()
    reference = cm.tiny_llama()  # another random init: π ≠ π_ref, so the loss is not log 2
    g = torch.Generator().manual_seed(1)

    def toks(n):
        return torch.randint(8, 32, (n,), generator=g).tolist()

    examples = [{"prompt_ids": [1, 4 + k % 4, *toks(3), 3], "chosen_ids": toks(2 + k) + [2],
                 "rejected_ids": toks(5 - k) + [2]} for k in range(4)]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    ours = cm.dpo_loss_linear(policy, reference, batch, beta=0.1)
    ours.backward()
    g_ours = policy.lm_head.weight.grad.clone()
    policy.zero_grad(set_to_none=True)
    want = _logits_dpo(policy, reference, batch, beta=0.1)
    want.backward()
    assert not math.isclose(float(want.detach()), math.log(2), abs_tol=1e-3)
    # tolerance policy (helpers.assert_close): the plain fp32 DPO is the yardstick, the same in float64 the truth
    policy64, reference64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    policy64.zero_grad(set_to_none=True)
    truth = _logits_dpo(policy64, reference64, batch, beta=0.1, dtype=torch.float64)
    truth.backward()
    assert_close(ours, want, truth, name="loss")
    assert_close(g_ours, policy.lm_head.weight.grad, policy64.lm_head.weight.grad, name="lm_head grad")


def test_toy_tokenizer_round_trip(cm):
    tok, names = cm.toy_tokenizer()
    ids = [1, 5, 8, 31, 17, 3, 9, 2]
    assert tok(" ".join(names[i] for i in ids))["input_ids"] == ids
    assert tok.pad_token_id == cm.PAD and tok.eos_token_id == cm.EOS
