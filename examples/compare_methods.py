"""Does it align? VAR against best-of-B SFT and DPO (TRL) on the toy task: reward vs KL, 3 seeds.

The toy task of ``toy_alignment.py`` (``examples/_toy.py``): a tiny Llama pre-trained on a synthetic
language is the reference π_ref; the reward of a response is the fraction of its content tokens
that have the color of the prompt's marker. Every method starts from π_ref and sees the same data:

- N training prompts, K = 8 responses each, sampled once from π_ref (up to 22 tokens; a prompt
  where one of its K samples hits that limit without EOS is dropped, for every method);
- the same budget: ``--steps`` optimizer steps of 16 sequences each, AdamW, the same learning rate,
  cosine schedule, warm-up and gradient clipping (``transformers.Trainer`` defaults: max norm 1);
- the same held-out prompts and sampling seed for evaluation.

Methods (one CSV row per method, setting and seed):

- ``reference``: no training.
- ``sft``: SFT on the best of the K responses of each prompt (cross-entropy, 16 per step).
- ``dpo``: TRL's ``DPOTrainer`` (sigmoid loss, β) on (best, worst) of the K responses (8 pairs per
  step; prompts whose K rewards are all equal have no pair). After each run, DPO written on
  ``varkernels.linear_sequence_logps`` is checked equal to TRL's loss and lm_head gradient on a batch.
- ``var``: ``VARTrainer`` on all N·K (prompt, response) examples in fixed groups of B ∈ {2, 4, 8}
  (16/B groups per step), ``weighting`` posterior or importance, and three forms:
  ``cross`` (random groups mixing prompts; R, Q are B×B: r(x_i, y_j), log π_ref(y_j | x_i)),
  ``shared`` (the same random groups, R, Q of shape (B,): one Ẑ per group) and ``per-prompt``
  (each group holds B of the K responses of one prompt, R, Q of shape (B,): Ẑ(x) is estimated
  from responses to x itself). Sequence log-probs are token means (``logp_reduction="mean"``);
  two extra settings (B = 8, cross) use token sums, where importance weights may overflow (a
  ``FloatingPointError`` is recorded as the run's status, not raised).

Per run: mean reward of one fresh sample per held-out prompt, KL(π‖π_ref) estimated on those
samples (mean over prompts of log π(y|x) − log π_ref(y|x), token-summed), and ``seconds`` = wall
time of ``trainer.train()``; ``prep_seconds`` = the method's data preparation (VAR: scoring R and
Q, once per seed, B and form, shared by both weightings; DPO: building the ``DPOTrainer``, which
tokenizes the pairs; SFT: nothing to score).

Run (the rows of benchmarks/results/alignment.csv; 8-11 minutes wall on the shared 2-core machine, 4 CPU-minutes):
    python examples/compare_methods.py
CI smoke run (every method trains, one seed, few steps; writes into --out or a temporary directory):
    python examples/compare_methods.py --quick --out /tmp/alignment
Table (markdown, mean ± std per setting) and plot from a CSV, without training:
    python examples/compare_methods.py --report benchmarks/results/alignment.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402
from _toy import EOS, MAX_NEW, PAD, Language, pretrain, reward, sample, tiny_llama  # noqa: E402

import varkernels  # noqa: E402
from varkernels.training.data import VARDataset  # noqa: E402
from varkernels.training.pairs import paired_logps  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K = 8  # responses sampled per training prompt (the largest B)
SEQS_PER_STEP = 16  # sequences per optimizer step, for every method
GROUP_SIZES = (2, 4, 8)
WEIGHTINGS = ("posterior", "importance")
FORMS = ("cross", "shared", "per-prompt")
COLUMNS = [
    "method", "weighting", "B", "form", "seed", "reward", "kl", "seconds", "prep_seconds", "status",
    "steps", "seqs_per_step", "lr", "beta", "reduction", "train_loss", "train_prompts", "eval_prompts",
    "var_weights_max", "var_ess", "dpo_check_loss_abs", "dpo_check_grad_rel", "date", "threads", "load_1min",
    "torch", "transformers", "trl",
]


# ----------------------------------------------------------------------------- data


class Setup:
    """The reference, the training samples (K per prompt, with rewards) and the held-out prompts."""

    def __init__(self, args):
        torch.manual_seed(args.data_seed)
        lang = Language(args.data_seed)
        self.reference = tiny_llama()
        self.pretrain_loss = pretrain(self.reference, lang, args.pretrain_steps)
        prompts = lang.prompts(args.train_prompts)
        self.eval_prompts = lang.prompts(args.eval_prompts)  # held out: never trained on
        # up to 2·MAX_NEW tokens, so that nearly every sample ends with EOS (the language's responses
        # have at most MAX_NEW tokens; a sample cut by the limit is not a whole response)
        flat = sample(self.reference, [x for x in prompts for _ in range(K)], seed=args.data_seed + 1,
                      max_new=2 * MAX_NEW)
        keep = [i for i in range(len(prompts)) if all(int(y[-1]) == EOS for y in flat[i * K: (i + 1) * K])]
        self.dropped = len(prompts) - len(keep)
        self.prompts = [prompts[i] for i in keep]
        self.responses = [flat[i * K: (i + 1) * K] for i in keep]  # [N][K]
        self.rewards = torch.tensor([reward([x] * K, ys) for x, ys in zip(self.prompts, self.responses)])  # [N, K]

    def best(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(prompt, best-of-K response) per prompt (the first best on ties)."""
        idx = self.rewards.argmax(dim=1).tolist()
        return [(x, ys[i]) for x, ys, i in zip(self.prompts, self.responses, idx)]

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(prompt, best, worst) per prompt whose K rewards are not all equal."""
        hi, lo = self.rewards.argmax(dim=1).tolist(), self.rewards.argmin(dim=1).tolist()
        return [(x, ys[h], ys[lw]) for x, ys, h, lw, r in zip(self.prompts, self.responses, hi, lo, self.rewards)
                if r.max() > r.min()]

    def examples(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """All N·K (prompt, response) examples (for VAR)."""
        xs = [x for x in self.prompts for _ in range(K)]
        ys = [y for ys in self.responses for y in ys]
        return xs, ys


class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        x, y = self.pairs[i]
        return {"input_ids": torch.cat([x, y]), "labels": torch.cat([torch.full_like(x, -100), y])}


def sft_collate(features: list[dict]) -> dict:
    """Right-pads x ⊕ y; labels are the response tokens, -100 on prompt and padding."""
    T = max(len(f["input_ids"]) for f in features)
    n = len(features)
    ids = torch.full((n, T), PAD, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    labels = torch.full((n, T), -100, dtype=torch.long)
    for r, f in enumerate(features):
        s = f["input_ids"]
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
        labels[r, : len(s)] = f["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def toy_tokenizer():
    """A word-level tokenizer whose ids are the toy language's token ids (TRL's DPOTrainer takes text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<pad>", "<s>", "</s>", "<sep>"] + [f"m{c}" for c in range(4)] + [f"w{t}" for t in range(8, 32)]
    tk = Tokenizer(models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                               eos_token="</s>")
    return tok, names


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy, reference, prompts, seed: int) -> tuple[float, float]:
    """Mean reward of one sample per prompt, and KL(π‖π_ref) estimated on the same samples."""
    ys = sample(policy, prompts, seed=seed)
    r = sum(reward(prompts, ys)) / len(prompts)
    lp = paired_logps(policy, prompts, ys, reduction="sum", batch_size=128, progress=False)
    lq = paired_logps(reference, prompts, ys, reduction="sum", batch_size=128, progress=False)
    return r, float((lp - lq).mean())


# ----------------------------------------------------------------------------- DPO check


def dpo_loss_linear(policy, reference, batch: dict, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss with sequence log-probs from ``varkernels.linear_sequence_logps``.

    ``batch`` is a batch of TRL's ``DataCollatorForPreference``: rows [chosen..., rejected...],
    ``completion_mask`` marks the response tokens. Log-probs are token sums (as TRL's).
    """
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)

    def logps(model):
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
        return varkernels.linear_sequence_logps(hidden, model.lm_head.weight, labels, reduction="sum",
                                                shift_labels=True)

    chosen, rejected = logps(policy).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = logps(reference).chunk(2)
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def check_dpo(trainer, reference, beta: float) -> tuple[float, float]:
    """TRL's DPO loss and lm_head gradient vs ``dpo_loss_linear`` on one training batch of the
    trained policy (π ≠ π_ref, so the loss is not the trivial log 2). Raises AssertionError."""
    model = trainer.model
    model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    weight = model.lm_head.weight
    model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grad = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    ours = dpo_loss_linear(model, reference, batch, beta)
    ours.backward()
    our_grad = weight.grad.clone()
    model.zero_grad(set_to_none=True)
    loss_abs = abs(float(trl_loss) - float(ours))
    grad_rel = float((our_grad - trl_grad).norm() / trl_grad.norm().clamp_min(1e-30))
    # fp32 sums over at most 2·8·12 tokens in a different order: a few ulps, far below 1e-5
    torch.testing.assert_close(ours.detach(), trl_loss.detach().float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_grad, trl_grad, rtol=1e-4, atol=1e-6)
    return loss_abs, grad_rel


# ----------------------------------------------------------------------------- training


def trainer_args(args, seed: int, out_dir: str, per_device: int) -> dict:
    return dict(
        output_dir=out_dir, per_device_train_batch_size=per_device, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0,
        logging_steps=args.steps, save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )


def quiet(trainer):
    """No printed logs (one log at the last step: VARTrainer's weight statistics over the whole run)."""
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    return trainer


def train_sft(setup, args, seed, tmp):
    policy = copy.deepcopy(setup.reference)
    t0 = time.perf_counter()
    ds = SFTDataset(setup.best())
    prep = time.perf_counter() - t0
    trainer = quiet(transformers.Trainer(
        model=policy, args=transformers.TrainingArguments(**trainer_args(args, seed, tmp, SEQS_PER_STEP)),
        train_dataset=ds, data_collator=sft_collate,
    ))
    t0 = time.perf_counter()
    out = trainer.train()
    return policy, time.perf_counter() - t0, prep, out.training_loss, {}


def train_dpo(setup, args, seed, tmp):
    import datasets
    from trl import DPOConfig, DPOTrainer

    tok, names = toy_tokenizer()

    def text(ids):
        return " ".join(names[int(t)] for t in ids)

    pairs = setup.pairs()
    data = datasets.Dataset.from_dict({
        "prompt": [text(x) for x, _, _ in pairs],
        "chosen": [" " + text(c) for _, c, _ in pairs],
        "rejected": [" " + text(r) for _, _, r in pairs],
    })
    policy = copy.deepcopy(setup.reference)
    config = DPOConfig(
        **trainer_args(args, seed, tmp, SEQS_PER_STEP // 2), beta=args.beta, loss_type=["sigmoid"],
        gradient_checkpointing=False, bf16=False, max_length=None, precompute_ref_log_probs=False,
    )
    t0 = time.perf_counter()
    trainer = quiet(DPOTrainer(model=policy, ref_model=copy.deepcopy(setup.reference), args=config,
                               train_dataset=data, processing_class=tok))
    prep = time.perf_counter() - t0
    # TRL tokenized the text: it must give back exactly the sampled token ids
    tds = trainer.train_dataset
    for k, (x, c, r) in enumerate(pairs):
        if tds[k]["prompt_ids"] != x.tolist() or tds[k]["chosen_ids"] != c.tolist() \
                or tds[k]["rejected_ids"] != r.tolist():
            raise AssertionError(f"TRL's tokenization of pair {k} differs from the sampled token ids")
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    loss_abs, grad_rel = check_dpo(trainer, setup.reference, args.beta)
    return policy, seconds, prep, out.training_loss, {"dpo_check_loss_abs": loss_abs, "dpo_check_grad_rel": grad_rel}


def build_var_dataset(setup, B: int, form: str, seed: int, reduction: str):
    """Groups of B over all N·K examples. cross / shared: ``VARDataset.build`` (random groups that mix
    prompts; R, Q are [B, B] or (B,)). per-prompt: each group holds B of the K responses of one
    prompt (a seeded split), so Ẑ(x) is estimated from responses to x itself; R, Q are (B,)."""
    xs, ys = setup.examples()
    t0 = time.perf_counter()
    if form in ("cross", "shared"):
        ds = VARDataset.build(
            xs, ys, ref_model=setup.reference, reward=reward, group_size=B, seed=seed, cross_pairs=form == "cross",
            reduction=reduction, pad_token_id=PAD, batch_size=64, progress=False,
        )
    else:
        gen = torch.Generator().manual_seed(seed)
        groups = []
        for i in range(len(setup.prompts)):
            order = (i * K + torch.randperm(K, generator=gen)).tolist()
            groups += [order[s: s + B] for s in range(0, K, B)]
        Q = paired_logps(setup.reference, xs, ys, reduction=reduction, batch_size=64, progress=False)
        idx = torch.tensor(groups)
        ds = VARDataset(xs, ys, groups, setup.rewards.reshape(-1)[idx], Q[idx], pad_token_id=PAD,
                        reduction=reduction)
    return ds, time.perf_counter() - t0


def train_var(setup, args, seed, tmp, ds, weighting):
    policy = copy.deepcopy(setup.reference)
    config = VARConfig(
        **trainer_args(args, seed, tmp, SEQS_PER_STEP // ds.group_size), beta=args.beta, weighting=weighting,
        logp_reduction=ds.reduction,
    )
    trainer = quiet(VARTrainer(model=policy, args=config, train_dataset=ds))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    log = [h for h in trainer.state.log_history if "var/ess" in h][-1]  # aggregated over all steps
    stats = {"var_weights_max": log["var/weights_max"], "var_ess": log["var/ess"]}
    return policy, seconds, out.training_loss, stats


# ----------------------------------------------------------------------------- driver


def env_info(args) -> dict:
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = ""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
        "steps": args.steps, "seqs_per_step": SEQS_PER_STEP, "lr": args.lr, "beta": args.beta,
    }


def run(args) -> Path:
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="alignment-")) if args.quick else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "alignment.csv"
    start = time.time()

    def say(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    setup = Setup(args)
    say(f"reference pre-trained (loss {setup.pretrain_loss:.3f}); {len(setup.prompts)} training prompts x {K} "
        f"samples ({setup.dropped} prompts dropped: a sample without EOS), mean sample reward "
        f"{float(setup.rewards.mean()):.3f}, best-of-{K} {float(setup.rewards.max(1).values.mean()):.3f}; "
        f"{len(setup.pairs())} DPO pairs")
    base = {**env_info(args), "train_prompts": len(setup.prompts), "eval_prompts": len(setup.eval_prompts)}

    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()

        def record(policy, seed, **row):
            if policy is not None:
                row["reward"], row["kl"] = evaluate(policy, setup.reference, setup.eval_prompts, 10_000 + seed)
            row = {**base, "seed": seed, "load_1min": round(os.getloadavg()[0], 2), "status": "ok", **row}
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
            f.flush()
            keys = ("method", "weighting", "B", "form")
            setting = " ".join(str(row[k]) for k in keys if row.get(k) not in (None, ""))
            say(f"{setting} seed {seed}: reward {row['reward']:.3f}  KL {row['kl']:.3f}  "
                f"train {row.get('seconds', 0):.1f}s  {row['status']}")

        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as tmp:
                record(setup.reference, seed, method="reference", seconds=0.0, prep_seconds=0.0)
                policy, sec, prep, loss, extra = train_sft(setup, args, seed, tmp)
                record(policy, seed, method="sft", B=K, form="best-of-B", seconds=sec, prep_seconds=prep,
                       train_loss=loss)
                policy, sec, prep, loss, extra = train_dpo(setup, args, seed, tmp)
                record(policy, seed, method="dpo", B=K, form="best-vs-worst", seconds=sec, prep_seconds=prep,
                       train_loss=loss, **extra)
                var_settings = [(form, B, "mean") for form in FORMS for B in GROUP_SIZES]
                if args.sum_check:  # token-summed log-probs: the importance weights' overflow risk
                    var_settings.append(("cross", max(GROUP_SIZES), "sum"))
                for form, B, reduction in var_settings:
                    ds, prep = build_var_dataset(setup, B, form, seed, reduction)
                    for weighting in WEIGHTINGS:
                        row = dict(method="var", weighting=weighting, B=B, form=form, reduction=reduction,
                                   prep_seconds=prep)
                        try:
                            policy, sec, loss, stats = train_var(setup, args, seed, tmp, ds, weighting)
                        except FloatingPointError as e:  # importance weights can overflow: a result too
                            record(None, seed, **row, reward=math.nan, kl=math.nan, seconds=math.nan,
                                   status=f"FloatingPointError: {str(e).splitlines()[0]}")
                            continue
                        record(policy, seed, **row, seconds=sec, train_loss=loss, **stats)
    say(f"rows written to {csv_path}")
    report(csv_path, out_dir / "alignment.png")
    return csv_path


# ----------------------------------------------------------------------------- report


def _read(csv_path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _setting(row) -> tuple:
    return row["method"], row["weighting"], row["form"], row["B"], row["reduction"]


def _order(key) -> tuple:
    method, weighting, form, B, reduction = key
    forms = ["", "best-of-B", "best-vs-worst", *FORMS]
    return (["reference", "sft", "dpo", "var"].index(method), reduction, weighting, forms.index(form),
            int(B) if B else 0)


def _pm(values: list[float], digits: int) -> str:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown table: mean ± sample std over seeds per setting; Δreward is paired with the
    reference row of the same seed (same held-out prompts and sampling seed). VAR ESS: effective
    sample size of the weights (1..B), mean over steps; VAR max w: largest weight of any step/seed."""
    ref = {r["seed"]: float(r["reward"]) for r in rows if r["method"] == "reference"}
    groups: dict = {}
    for r in rows:
        groups.setdefault(_setting(r), []).append(r)
    out = ["| method | weighting | form | B | log-probs | runs | reward | Δreward vs ref | KL(π‖π_ref) | train s "
           "| prep s | VAR ESS | VAR max w |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=_order):
        g = groups[key]
        ok = [r for r in g if r["status"] == "ok"]
        fails = len(g) - len(ok)
        runs = f"{len(ok)}" + (f" (+{fails} failed)" if fails else "")
        rew = [float(r["reward"]) for r in ok]
        delta = [float(r["reward"]) - ref[r["seed"]] for r in ok if r["seed"] in ref]
        cells = [*key, runs, _pm(rew, 3), _pm(delta, 3) if key[0] != "reference" else "0",
                 _pm([float(r["kl"]) for r in ok], 2), _pm([float(r["seconds"]) for r in ok], 1),
                 _pm([float(r["prep_seconds"]) for r in ok], 1)]
        if key[0] == "var":
            wmax = [float(r["var_weights_max"]) for r in ok]
            cells += [_pm([float(r["var_ess"]) for r in ok], 2), f"{max(wmax):.3g}" if wmax else "–"]
        else:
            cells += ["", ""]
        out.append("| " + " | ".join(c if c != "" else "–" for c in cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {("reference", ""): "black", ("sft", ""): "tab:blue", ("dpo", ""): "tab:orange",
              ("var", "posterior"): "tab:green", ("var", "importance"): "tab:red"}
    markers = {"cross": "o", "shared": "s", "per-prompt": "v", "best-of-B": "D", "best-vs-worst": "^", "": "*"}
    sizes = {"2": 25, "4": 50, "8": 90, "": 90}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    seen = set()
    for r in rows:
        if r["status"] != "ok":
            continue
        label = " ".join(x for x in (r["method"], r["weighting"], r["form"]) if x)
        if r["reduction"] == "sum":
            label += " (sum log-probs)"
        c = colors[(r["method"], r["weighting"])]
        hollow = r["reduction"] == "sum"
        ax.scatter(float(r["kl"]), float(r["reward"]), marker=markers[r["form"]], s=sizes[r["B"]], alpha=0.75,
                   facecolors="none" if hollow else c, edgecolors=c if hollow else "none",
                   label=None if label in seen else label)
        seen.add(label)
    ax.set_xlabel("KL(π‖π_ref), nats per response (estimated on the evaluation samples)")
    ax.set_ylabel("mean reward on held-out prompts")
    ax.set_title("Toy alignment: one point per run (VAR: marker size = B ∈ {2, 4, 8})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def report(csv_path, png=None) -> None:
    rows = _read(csv_path)
    print(table(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"failed: {' '.join(_setting(r))} seed {r['seed']}: {r['status']}")
    png = Path(png) if png else Path(csv_path).with_suffix(".png")
    plot(rows, png)
    print(f"plot: {png}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 1 seed, few steps, small data")
    ap.add_argument("--out", default=None, help="directory for alignment.csv / alignment.png (default: "
                    "benchmarks/results; with --quick a new temporary directory)")
    ap.add_argument("--report", metavar="CSV", help="print the table of CSV and redraw its plot; no training")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds 0..n-1 (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 120; --quick 8)")
    ap.add_argument("--train-prompts", type=int, default=None, help="default 256; --quick 64")
    ap.add_argument("--eval-prompts", type=int, default=None, help="default 512; --quick 128")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default 300; --quick 120")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the language, reference and samples")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; --quick 2)")
    ap.add_argument("--beta", type=float, default=0.1, help="β of VAR and of DPO")
    ap.add_argument("--no-sum-check", dest="sum_check", action="store_false",
                    help="skip the VAR runs with token-summed log-probs (B=8, cross-pair; all other VAR runs use "
                         "the mean over tokens, which keeps importance weights finite)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the models are tiny)")
    args = ap.parse_args(argv)
    if args.report:
        if not Path(args.report).is_file():
            ap.error(f"--report: no such CSV file: {args.report}")
        report(args.report)
        return
    defaults = dict(seeds=(3, 1), steps=(120, 8), train_prompts=(256, 64), eval_prompts=(512, 128),
                    pretrain_steps=(300, 120), warmup=(10, 2))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {getattr(args, name)}")
    if args.train_prompts * K < SEQS_PER_STEP:
        ap.error(f"--train-prompts must be >= {SEQS_PER_STEP // K} (one step needs {SEQS_PER_STEP} sequences)")
    if not args.beta > 0 or not args.lr > 0:
        ap.error(f"--beta and --lr must be > 0, got beta={args.beta}, lr={args.lr}")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("varkernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    run(args)


if __name__ == "__main__":
    sys.exit(main())
