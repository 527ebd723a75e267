"""Does it align? VAR against best-of-B SFT, DPO and GRPO (TRL) on the toy task: reward vs KL, 3 seeds.

Three suites (``--suite``): ``ablation`` (below: offline VAR's B / weighting / form against SFT and DPO,
alignment.csv), ``frontier`` (every method at three or four settings of its main knob, TRL's
``GRPOTrainer`` and ``OnlineVARTrainer`` included, the online methods at two learning rates and the
offline ones at the rate of a validation sweep, alignment_frontier.csv; see ``run_frontier``) and
``timing`` (the online methods' wall time in interleaved rounds, alignment_timing.csv). ``all``
(default) runs the first two.

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
    python examples/compare_methods.py --suite ablation
The frontier (alignment_frontier.csv / .png, alignment_time.png; docs/alignment.md gives its run time) and the timing:
    python examples/compare_methods.py --suite frontier
    python examples/compare_methods.py --suite timing
CI smoke run (every method of both suites trains, one seed, few steps; into --out or a temporary directory):
    python examples/compare_methods.py --quick --out /tmp/alignment
Rows that moved between two frontier runs (tests/test_examples.py checks a --quick run against
benchmarks/results/alignment_frontier_quick.csv this way):
    python examples/compare_methods.py --compare OLD.csv NEW.csv
Table (markdown, mean ± std per setting) and plot from a CSV, without training:
    python examples/compare_methods.py --report benchmarks/results/alignment.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import functools
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
from varkernels.training.lm_head import unwrap_model  # noqa: E402
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
        # the frontier suite's learning-rate sweep selects on these (drawn last: nothing above changes)
        self.val_prompts = lang.prompts(max(args.eval_prompts // 2, 1))
        self._reference_dir = None

    def reference_dir(self) -> str:
        """π_ref saved once to a temporary directory: TRL's GRPOTrainer builds its KL reference from a path."""
        if self._reference_dir is None:
            self._reference_dir = tempfile.mkdtemp(prefix="toy-reference-")
            self.reference.save_pretrained(self._reference_dir)
        return self._reference_dir

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


def _output(args, name: str):
    """The CSV path of a suite (``--out``, else benchmarks/results, or a new temporary folder with --quick)
    and its ``say``: a progress line prefixed with the seconds since the suite started."""
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="alignment-")) if args.quick else ROOT / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def say(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    return out_dir / name, say


def run(args) -> Path:
    csv_path, say = _output(args, "alignment.csv")

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
    report(csv_path, csv_path.parent / "alignment.png")
    return csv_path


# ----------------------------------------------------------------------------- frontier suite: online methods


# (method, variant): (knob, its settings, the setting of the learning-rate sweep)
FRONTIER = {
    ("sft", ""): ("steps", (0.25, 1, 3), 1),  # × --steps
    ("dpo", ""): ("beta", (0.03, 0.1, 1.0), 0.1),
    ("var", "per-prompt B=8"): ("beta", (0.02, 0.1, 0.5), 0.1),
    ("grpo", ""): ("kl_coef", (0.0, 0.1, 0.3, 1.0), 0.1),
    ("var-online", "policy"): ("beta", (0.03, 0.1, 0.3, 1.0), 0.1),
    ("var-online", "initial"): ("beta", (0.03, 0.1, 0.3, 1.0), 0.1),
    ("var-online", "initial sum"): ("beta", (0.03, 0.1, 0.3, 1.0), 0.1),  # var_logp_reduction="sum"
    ("var-online", "initial centred"): ("beta", (0.01, 0.03, 0.1), 0.03),  # var_baseline="mean"
}
ONLINE = ("grpo", "var-online")  # run at every learning rate of --online-lrs, no sweep
LR_GRID = (1e-3, 3e-3, 1e-2)  # the offline methods' sweep
ONLINE_LRS = (1e-3, 3e-3)
FRONTIER_COLUMNS = [
    "stage", "method", "variant", "knob", "value", "lr", "seed", "reward", "kl", "val_reward", "seconds",
    "gen_seconds", "score_seconds", "train_seconds", "prep_seconds", "steps", "status", "var_weights_max", "var_ess",
    "curve", "date", "threads", "load_1min", "torch", "transformers", "trl", "revision",
]


def revision() -> str:
    """The checkout's short commit, with "-dirty" when tracked files differ from it ("" outside git)."""
    import subprocess

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("-dirty" if head and git("status", "--porcelain", "--untracked-files=no") else "")


def toy_text(names, ids) -> str:
    return " ".join(names[int(t)] for t in ids)


def trl_reward(names):
    """The toy reward in TRL's reward-function contract (prompts as text; completion ids)."""
    index = {n: i for i, n in enumerate(names)}

    def toy_reward(prompts, completions, completion_ids, **kwargs):
        xs = [torch.tensor([index[w] for w in p.split()]) for p in prompts]
        return reward(xs, [torch.tensor(list(c), dtype=torch.long) for c in completion_ids])

    return toy_reward


class Timers:
    """Wall time of TRL's generation (``_generate``) and of the rest of ``_generate_and_score_completions``
    (rewards, π_old / π_ref log-probs, weights: "scoring"), by wrapping the trainer instance's methods."""

    def __init__(self, trainer):
        self.gen = self.gen_score = 0.0
        trainer._generate = self._timed(trainer._generate, "gen")
        trainer._generate_and_score_completions = self._timed(trainer._generate_and_score_completions, "gen_score")

    def _timed(self, fn, key):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(self, key, getattr(self, key) + time.perf_counter() - t0)

        return wrapper


class EvalAt(transformers.TrainerCallback):
    """Held-out reward and KL at some optimizer steps (the time-to-reward curve). The evaluation's
    time is left out of the run's clock and the torch RNG is restored, so training is unchanged."""

    def __init__(self, setup, seed, steps):
        self.setup, self.seed, self.steps = setup, seed, set(steps)
        self.start = None
        self.eval_seconds = 0.0
        self.points = []  # (step, training seconds so far, reward, kl)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        t0 = time.perf_counter()
        rng = torch.get_rng_state()
        r, kl = evaluate(model, self.setup.reference, self.setup.eval_prompts, 10_000 + self.seed)
        torch.set_rng_state(rng)
        model.train()
        self.points.append((state.global_step, t0 - self.start - self.eval_seconds, r, kl))
        self.eval_seconds += time.perf_counter() - t0


def train_online(setup, args, seed, tmp, method, variant, value, curve_steps=()):
    """TRL's GRPOTrainer (``value``: its KL coefficient ``beta``) or OnlineVARTrainer (``value``: var_beta,
    ``variant``: var_reference, then "sum" for var_logp_reduction="sum" or "centred" for var_baseline="mean")
    on the training prompts: ``args.steps`` steps of 2 prompts × K completions."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from varkernels.training.online import OnlineVARConfig, OnlineVARTrainer

    tok, names = toy_tokenizer()
    data = datasets.Dataset.from_dict({"prompt": [toy_text(names, x) for x in setup.prompts]})
    common = dict(**trainer_args(args, seed, tmp, SEQS_PER_STEP), num_generations=K, max_completion_length=MAX_NEW,
                  bf16=False, temperature=1.0, top_k=0, top_p=1.0)
    if method == "grpo":
        config, cls = GRPOConfig(**common, beta=float(value)), GRPOTrainer
    else:
        reference, *extra = variant.split()  # "initial", "policy", "initial sum", "initial centred"
        config = OnlineVARConfig(**common, var_beta=float(value), var_reference=reference,
                                 var_logp_reduction="sum" if "sum" in extra else "mean",
                                 var_baseline="mean" if "centred" in extra else "none")
        cls = OnlineVARTrainer
    t0 = time.perf_counter()
    trainer = quiet(cls(model=setup.reference_dir(), reward_funcs=trl_reward(names), args=config, train_dataset=data,
                        processing_class=tok))
    prep = time.perf_counter() - t0
    timers = Timers(trainer)
    evals = EvalAt(setup, seed, curve_steps)
    trainer.add_callback(evals)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0 - evals.eval_seconds
    stats = {"gen_seconds": timers.gen, "score_seconds": timers.gen_score - timers.gen,
             "train_seconds": seconds - timers.gen_score}
    logs = [h for h in trainer.state.log_history if "var/ess" in h]
    if logs:
        stats["var_ess"] = statistics.mean(h["var/ess"] for h in logs)
        stats["var_weights_max"] = max(h["var/weights_max"] for h in logs)
    policy = unwrap_model(trainer.model)
    return policy, seconds, prep, stats, evals.points


def train_method(setup, args, seed, tmp, method, variant, knob, value, lr, curve_steps=()):
    """One frontier run: (policy, row fields)."""
    a = copy.copy(args)
    a.lr = lr
    if knob == "steps":
        a.steps = int(value)
    elif knob == "beta" and method in ("dpo", "var"):
        a.beta = float(value)
    row = {"method": method, "variant": variant, "knob": knob, "value": value, "lr": lr, "steps": a.steps}
    if method == "sft":
        policy, sec, prep, _, _ = train_sft(setup, a, seed, tmp)
        return policy, {**row, "seconds": sec, "train_seconds": sec, "prep_seconds": prep}
    if method == "dpo":
        policy, sec, prep, _, _ = train_dpo(setup, a, seed, tmp)
        return policy, {**row, "seconds": sec, "train_seconds": sec, "prep_seconds": prep}
    if method == "var":
        ds, prep = build_var_dataset(setup, K, "per-prompt", seed, "mean")
        policy, sec, _, stats = train_var(setup, a, seed, tmp, ds, "posterior")
        return policy, {**row, "seconds": sec, "train_seconds": sec, "prep_seconds": prep, **stats}
    policy, sec, prep, stats, points = train_online(setup, a, seed, tmp, method, variant, value, curve_steps)
    curve = ";".join(f"{s}:{t:.2f}:{r:.4f}:{k:.3f}" for s, t, r, k in points)
    return policy, {**row, "seconds": sec, "prep_seconds": prep, "curve": curve, **stats}


def run_frontier(args) -> Path:
    """Each method at every setting of its main knob, 3 seeds. The online methods (GRPO, online VAR) run at
    every learning rate of ``--online-lrs``; the offline ones at the learning rate chosen per method by a
    sweep (seed 0, the method's sweep setting, highest mean reward on the validation prompts)."""
    csv_path, say = _output(args, "alignment_frontier.csv")

    setup = Setup(args)
    say(f"reference pre-trained (loss {setup.pretrain_loss:.3f}); {len(setup.prompts)} training prompts, "
        f"{len(setup.val_prompts)} validation prompts, {len(setup.eval_prompts)} held-out prompts")
    base = {**env_info(args), "revision": revision()}
    lr_grid = args.lr_grid
    methods = [m for m in FRONTIER if args.methods is None or m[0] in args.methods]
    def scaled(knob, v):
        return max(1, round(v * args.steps)) if knob == "steps" else v

    knobs = {m: (FRONTIER[m][0], tuple(scaled(FRONTIER[m][0], v) for v in FRONTIER[m][1]),
                 scaled(FRONTIER[m][0], FRONTIER[m][2])) for m in methods}
    curve_steps = sorted({max(1, round(args.steps * f)) for f in (0.25, 0.5, 0.75)} - {args.steps})
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FRONTIER_COLUMNS)
        writer.writeheader()

        def record(policy, seed, **row):
            if policy is not None:
                row["reward"], row["kl"] = evaluate(policy, setup.reference, setup.eval_prompts, 10_000 + seed)
            row = {**base, "seed": seed, "load_1min": round(os.getloadavg()[0], 2), "status": "ok", **row}
            writer.writerow({k: row.get(k, "") for k in FRONTIER_COLUMNS})
            f.flush()
            keys = ("stage", "method", "variant", "knob", "value")
            setting = " ".join(str(row[k]) for k in keys if row.get(k) not in (None, ""))
            say(f"{setting} lr {row.get('lr', '')} seed {seed}: reward {row['reward']:.3f}  KL {row['kl']:.3f}  "
                f"val {row.get('val_reward', '') or '-'}  train {row.get('seconds', 0):.1f}s  {row['status']}")
            return row

        def attempt(seed, key, knob, value, lr):
            """train_method, with a failure (e.g. a diverged run) recorded as the row's status, not raised."""
            try:
                return train_method(setup, args, seed, tmp, *key, knob, value, lr, curve_steps)
            except (FloatingPointError, RuntimeError, ValueError) as e:
                return None, {"method": key[0], "variant": key[1], "knob": knob, "value": value, "lr": lr,
                              "reward": math.nan, "kl": math.nan, "status": f"{type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}"}

        for seed in range(args.seeds):
            record(setup.reference, seed, stage="frontier", method="reference", variant="", knob="", value="",
                   seconds=0.0)
        chosen, sweep_rows = {m: tuple(args.online_lrs) for m in methods if m[0] in ONLINE}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for key in (m for m in methods if m not in chosen):  # offline learning-rate sweep: seed 0, middle setting
                knob, values, mid = knobs[key]
                best = None
                for lr in lr_grid:
                    policy, row = attempt(0, key, knob, mid, lr)
                    val = math.nan
                    if policy is not None:
                        val = sum(reward(setup.val_prompts, sample(policy, setup.val_prompts, seed=20_000))) / len(
                            setup.val_prompts)
                    row = record(policy, 0, stage="lr-sweep", val_reward=round(val, 4), **row)
                    sweep_rows[(key, lr)] = row
                    if policy is not None and (best is None or val > best[0]):
                        best = (val, lr)
                if best is None:
                    say(f"{' '.join(k for k in key if k)}: every learning rate failed; method skipped")
                    continue
                chosen[key] = (best[1],)
                say(f"{' '.join(k for k in key if k)}: learning rate {best[1]:g} (validation reward {best[0]:.3f})")
            for seed in range(args.seeds):
                for key in (m for m in methods if m in chosen):
                    knob, values, mid = knobs[key]
                    for lr in chosen[key]:
                        for value in values:
                            if (key, lr) in sweep_rows and seed == 0 and value == mid:  # the sweep's run
                                row = {k: v for k, v in sweep_rows[(key, lr)].items() if k in FRONTIER_COLUMNS}
                                row["stage"] = "frontier"
                                writer.writerow({k: row.get(k, "") for k in FRONTIER_COLUMNS})
                                f.flush()
                                continue
                            policy, row = attempt(seed, key, knob, value, lr)
                            record(policy, seed, stage="frontier", **row)
    say(f"rows written to {csv_path}")
    report_frontier(csv_path, csv_path.parent)
    return csv_path


# two pairs at about the same KL on the frontier: without a reference model (GRPO KL coefficient 0,
# online VAR "policy"), and with one (GRPO 0.3 and online VAR "initial" β = 0.1, both at KL ≈ 4)
TIMING = [("grpo", "", "kl_coef", 0.0), ("var-online", "policy", "beta", 0.3), ("grpo", "", "kl_coef", 0.3),
          ("var-online", "initial", "beta", 0.1)]


def run_timing(args) -> Path:
    """Wall time of the online methods, interleaved: ``--seeds`` rounds of ``TIMING`` (GRPO and online VAR,
    with and without a reference model), each run at ``--lr`` with seed 0, so that a change of
    load on the shared machine hits every method alike. The runs of a method are identical but for time
    (fixed seeds); the held-out reward and KL of each run are recorded with its curve."""
    csv_path, say = _output(args, "alignment_timing.csv")
    setup = Setup(args)
    base = env_info(args)
    curve_steps = sorted({max(1, round(args.steps * f)) for f in (0.25, 0.5, 0.75)} - {args.steps})
    with open(csv_path, "w", newline="") as f, tempfile.TemporaryDirectory() as tmp:
        writer = csv.DictWriter(f, fieldnames=FRONTIER_COLUMNS)
        writer.writeheader()
        r0, kl0 = evaluate(setup.reference, setup.reference, setup.eval_prompts, 10_000)
        writer.writerow({k: v for k, v in {**base, "stage": "timing", "method": "reference", "seed": 0, "reward": r0,
                                           "kl": kl0, "seconds": 0.0, "status": "ok"}.items() if k in FRONTIER_COLUMNS})
        for rnd in range(args.seeds):
            for method, variant, knob, value in TIMING:
                load = round(os.getloadavg()[0], 2)
                policy, row = train_method(setup, args, 0, tmp, method, variant, knob, value, args.lr, curve_steps)
                row["reward"], row["kl"] = evaluate(policy, setup.reference, setup.eval_prompts, 10_000)
                row = {**base, **row, "stage": f"timing round {rnd}", "seed": 0, "load_1min": load, "status": "ok"}
                writer.writerow({k: row.get(k, "") for k in FRONTIER_COLUMNS})
                f.flush()
                say(f"round {rnd} {_label(row)} {knob}={value}: {row['seconds']:.1f} s "
                    f"(generation {row['gen_seconds']:.1f}, scoring {row['score_seconds']:.1f}, update "
                    f"{row['train_seconds']:.1f}) reward {row['reward']:.3f} KL {row['kl']:.2f} load {load}")
    report_timing(csv_path)
    return csv_path


def report_timing(csv_path) -> None:
    rows = _read(csv_path)
    print(timing_table(rows))
    for target in (0.7, 0.8, 0.9):
        print(f"\ntraining seconds to a held-out reward of {target} (median over rounds; n/r: not reached):")
        for key, hits in time_to_reward(rows, target, stage="timing").items():
            got = [h for h in hits if h is not None]
            cell = f"{statistics.median(got):.1f} s" if got else "n/r"
            print(f"  {key[0]} {key[1]}={key[2]}: {cell} ({len(got)}/{len(hits)} rounds reached it)")


def timing_table(rows: list[dict]) -> str:
    """Median over the rounds of each online method's wall time and its split."""
    out = ["| method | knob = value | rounds | reward | KL | train s (median, min–max) | generation s | scoring s "
           "| update s | s per step |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        if r["method"] != "reference":
            groups.setdefault((_label(r), r["knob"], r["value"]), []).append(r)
    for (label, knob, value), g in groups.items():
        def med(name):
            return statistics.median(float(r[name]) for r in g)

        secs = [float(r["seconds"]) for r in g]
        out.append(f"| {label} | {knob} = {value} | {len(g)} | {float(g[0]['reward']):.3f} | {float(g[0]['kl']):.2f} "
                   f"| {med('seconds'):.1f} ({min(secs):.1f}–{max(secs):.1f}) | {med('gen_seconds'):.1f} "
                   f"| {med('score_seconds'):.1f} | {med('train_seconds'):.1f} "
                   f"| {med('seconds') / float(g[0]['steps']):.3f} |")
    return "\n".join(out)


def _label(row) -> str:
    return " ".join(x for x in (row["method"], row["variant"]) if x)


def _series(row) -> str:
    """``_label`` with the learning rate for the online methods, which run at several."""
    return f"{_label(row)} lr {float(row['lr']):g}" if row["method"] in ONLINE else _label(row)


def _series_order(row) -> tuple:
    order = ["reference"] + list(dict.fromkeys(m for m, _ in FRONTIER))
    return order.index(row["method"]), row["variant"], float(row["lr"] or 0) if row["method"] in ONLINE else 0.0


def frontier_tables(rows: list[dict]) -> str:
    """The learning-rate sweep, the frontier (mean ± std over seeds per setting) and the time split."""
    ok = [r for r in rows if r["status"] == "ok"]
    out = ["Learning-rate sweep (seed 0, one setting per method; chosen: highest validation reward)", "",
           "| method | knob = value | lr | validation reward | held-out reward | KL(π‖π_ref) | train s |",
           "|---|---|---|---|---|---|---|"]
    for r in (r for r in ok if r["stage"] == "lr-sweep"):
        out.append(f"| {_label(r)} | {r['knob']} = {r['value']} | {float(r['lr']):g} | {float(r['val_reward']):.3f} "
                   f"| {float(r['reward']):.3f} | {float(r['kl']):.2f} | {float(r['seconds']):.1f} |")
    ref = {r["seed"]: float(r["reward"]) for r in ok if r["method"] == "reference"}
    groups: dict = {}
    for r in (r for r in ok if r["stage"] == "frontier"):
        groups.setdefault((_series(r), r["knob"], r["value"]), []).append(r)
    out += ["", "| method | knob = value | lr | runs | reward | Δreward vs ref | KL(π‖π_ref) | train s | generation s "
            "| scoring s | update s | VAR ESS |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (*_series_order(groups[k][0]), float(k[2] or 0))):
        g = groups[key]
        if g[0]["method"] == "reference":
            out.append(f"| reference | – | – | {len(g)} | {_pm([float(r['reward']) for r in g], 3)} | 0 | 0.00 "
                       "| – | – | – | – | – |")
            continue

        def col(name, digits=1):
            vals = [float(r[name]) for r in g if r.get(name) not in (None, "")]
            return _pm(vals, digits) if vals else "–"

        delta = [float(r["reward"]) - ref[r["seed"]] for r in g if r["seed"] in ref]
        out.append(f"| {_label(g[0])} | {key[1]} = {key[2]} | {float(g[0]['lr']):g} | {len(g)} | "
                   f"{col('reward', 3)} | {_pm(delta, 3)} | {col('kl', 2)} | {col('seconds')} | {col('gen_seconds')} "
                   f"| {col('score_seconds')} | {col('train_seconds')} | {col('var_ess', 2)} |")
    return "\n".join(out)


def time_to_reward(rows: list[dict], target: float, stage: str = "frontier") -> dict:
    """Per online setting: the training seconds of each run (seed or timing round) at which the held-out
    reward first reaches ``target`` (linear interpolation between the evaluated steps, from the
    reference's reward at 0 s; None if never reached). ``stage``: rows whose stage starts with it."""
    out: dict = {}
    for r in rows:
        if not r["stage"].startswith(stage) or r["status"] != "ok" or r["method"] not in ONLINE:
            continue
        evals = (p.split(":") for p in r["curve"].split(";") if p)
        pts = [(0.0, None)] + [(float(t), float(rw)) for _, t, rw, _ in evals]
        pts.append((float(r["seconds"]), float(r["reward"])))
        refs = [float(x["reward"]) for x in rows if x["method"] == "reference" and x["seed"] == r["seed"]]
        pts[0] = (0.0, refs[0] if refs else 0.0)
        hit = None
        for (t0, r0), (t1, r1) in zip(pts, pts[1:]):
            if r1 >= target:
                hit = t0 + (t1 - t0) * ((target - r0) / (r1 - r0) if r1 > r0 else 1.0)
                break
        out.setdefault((_series(r), r["knob"], r["value"]), []).append(hit)
    return out


COLORS = {"sft": "tab:blue", "dpo": "tab:orange", "var per-prompt B=8": "tab:green", "grpo": "tab:purple",
          "var-online policy": "tab:red", "var-online initial": "tab:brown", "var-online initial sum": "tab:pink",
          "var-online initial centred": "tab:cyan"}


def _curve(ax, sel: list[dict], color, label, linestyle, annotate=True) -> None:
    """One method's points (mean KL, mean reward ± std over seeds per setting), joined in knob order."""
    pts = {}
    for r in sel:
        pts.setdefault(float(r["value"]), []).append((float(r["kl"]), float(r["reward"])))
    if not pts:
        return
    vals = sorted(pts)
    kl = [statistics.mean(p[0] for p in pts[v]) for v in vals]
    rw = [statistics.mean(p[1] for p in pts[v]) for v in vals]
    err = [statistics.stdev(p[1] for p in pts[v]) if len(pts[v]) > 1 else 0.0 for v in vals]
    ax.errorbar(kl, rw, yerr=err, marker="o", color=color, label=label, capsize=3, alpha=0.85, linestyle=linestyle)
    for v, x, y in zip(vals, kl, rw):
        if annotate:
            ax.annotate(f"{sel[0]['knob']}={v:g}", (x, y), fontsize=6, xytext=(3, -9), textcoords="offset points",
                        color=color)


def plot_frontier(rows: list[dict], out_dir: Path) -> None:
    """alignment_frontier.png: reward against KL, one panel per learning rate of the online methods (the
    offline methods, at their swept rate, in every panel), and a close-up of GRPO and online VAR "initial"
    (default and centred weights, every learning rate) around KL 4; alignment_time.png: reward against
    training time of the online runs, one panel per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["stage"] == "frontier"]
    online_lrs = sorted({float(r["lr"]) for r in ok if r["method"] in ONLINE}) or [None]
    ref = [r for r in ok if r["method"] == "reference"]
    close = ("grpo", "var-online initial", "var-online initial centred")
    zoom = online_lrs[0] is not None and any(_label(r) in close for r in ok)
    n = len(online_lrs) + zoom
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5.5), squeeze=False)
    for ax, lr in zip(axes[0], online_lrs):
        if ref:
            ax.scatter([0.0], [statistics.mean(float(r["reward"]) for r in ref)], marker="*", s=150, color="black",
                       label="reference")
        for label, c in COLORS.items():
            sel = [r for r in ok if _label(r) == label and (r["method"] not in ONLINE or float(r["lr"]) == lr)]
            _curve(ax, sel, c, label, "-" if sel and sel[0]["method"] in ONLINE else ":")
        ax.set_title(f"online methods at lr {lr:g} (dotted: offline, swept lr)" if lr else "reward–KL frontier",
                     fontsize=10)
    if zoom:
        ax = axes[0][-1]
        styles = {lr: ("-", "--", ":", "-.")[k % 4] for k, lr in enumerate(sorted(online_lrs, reverse=True))}
        for label in close:
            for lr in online_lrs:
                sel = [r for r in ok if _label(r) == label and float(r["lr"]) == lr]
                _curve(ax, sel, COLORS[label], f"{label} lr {lr:g}", styles[lr])
        ax.axvline(4.0, color="grey", linewidth=0.8)
        ax.set_xlim(1.5, 5.0)
        ax.set_ylim(0.8, 1.0)
        ax.set_title("close-up at KL ≤ 5: GRPO and online VAR \"initial\", both learning rates", fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("KL(π‖π_ref), nats per response (estimated on the evaluation samples)")
        ax.set_ylabel("mean reward on held-out prompts")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Toy alignment: reward–KL frontier (mean ± std over seeds per setting)")
    fig.tight_layout()
    fig.savefig(out_dir / "alignment_frontier.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(online_lrs), figsize=(7 * len(online_lrs), 5.5), sharey=True, squeeze=False)
    for ax, lr in zip(axes[0], online_lrs):
        for label in (k for k in COLORS if k.split()[0] in ONLINE):
            runs = [r for r in ok if _label(r) == label and float(r["lr"]) == lr]
            for k, value in enumerate(sorted({float(r["value"]) for r in runs})):
                sel = [r for r in runs if float(r["value"]) == value]
                curves = []
                for r in sel:
                    pts = [(float(t), float(rw)) for _, t, rw, _ in (p.split(":") for p in r["curve"].split(";") if p)]
                    curves.append(pts + [(float(r["seconds"]), float(r["reward"]))])
                n = min(len(c) for c in curves)
                t = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
                y = [statistics.mean(c[i][1] for c in curves) for i in range(n)]
                ax.plot(t, y, marker=".", color=COLORS[label], linestyle=("-", "--", ":", "-.")[k % 4], alpha=0.85,
                        label=f"{label} {sel[0]['knob']}={value:g}")
        ax.set_xlabel("training wall time, s (generation + scoring + update; evaluation excluded)")
        ax.set_title(f"lr {lr:g}" if lr else "", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel("mean reward on held-out prompts")
    fig.suptitle("Time to reward: online VAR against GRPO (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out_dir / "alignment_time.png", dpi=120)
    plt.close(fig)


def best_within_kl(rows: list[dict], budget: float) -> dict:
    """Per series (``_series``): the setting with the best mean reward (over seeds) among those whose mean KL
    is within ``budget``, as (mean reward, its std, setting, mean KL); a series with none is left out."""
    points: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["stage"] == "frontier" and r["method"] != "reference":
            points.setdefault(_series(r), {}).setdefault(r["value"], []).append((float(r["kl"]), float(r["reward"])))
    out = {}
    for series, settings in points.items():
        means = [(statistics.mean(p[1] for p in v), statistics.stdev(p[1] for p in v) if len(v) > 1 else 0.0, k,
                  statistics.mean(p[0] for p in v)) for k, v in settings.items()]
        inside = [m for m in means if m[3] <= budget]
        if inside:
            out[series] = max(inside, key=lambda m: m[0])
    return out


def reward_within_kl(rows: list[dict], budgets=(1.0, 2.0, 4.0, 8.0)) -> str:
    """Markdown: per method (and online learning rate), the best mean reward ± its std over seeds among the
    settings whose mean KL is within each budget — the frontier read at matched KL ("–": no setting that
    close to π_ref)."""
    ok = sorted((r for r in rows if r["status"] == "ok" and r["stage"] == "frontier" and r["method"] != "reference"),
                key=_series_order)
    best = {b: best_within_kl(rows, b) for b in budgets}
    out = ["| method | " + " | ".join(f"KL ≤ {b:g}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for series in dict.fromkeys(_series(r) for r in ok):
        cells = [f"{m[0]:.3f} ± {m[1]:.3f} ({m[2]}, KL {m[3]:.2f})" if (m := best[b].get(series)) else "–"
                 for b in budgets]
        out.append(f"| {series} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def against_grpo(rows: list[dict], budget: float = 4.0) -> str:
    """Each online VAR series against the best GRPO series (over its learning rates) at matched KL (≤ ``budget``):
    the difference of their best mean rewards and whether it is within that GRPO setting's std over seeds."""
    best = best_within_kl(rows, budget)
    grpo = [(s, m) for s, m in best.items() if s.startswith("grpo")]
    if not grpo:
        return f"(no GRPO setting within KL {budget:g})"
    gs, g = max(grpo, key=lambda x: x[1][0])
    out = [f"best GRPO within KL {budget:g}: {gs} {g[0]:.3f} ± {g[1]:.3f} (setting {g[2]}, KL {g[3]:.2f})"]
    for s, m in best.items():
        if s.startswith("var-online"):
            d = m[0] - g[0]
            side = "within" if abs(d) <= g[1] else ("above" if d > 0 else "below") + " by more than"
            out.append(f"  {s}: {m[0]:.3f} ± {m[1]:.3f} (setting {m[2]}, KL {m[3]:.2f}), {d:+.3f} against GRPO: "
                       f"{side} one GRPO std")
    return "\n".join(out)


ROW_KEY = ("stage", "method", "variant", "knob", "value", "lr", "seed")
ROW_VALUES = ("status", "reward", "kl", "val_reward")


def moved_rows(committed: list[dict], fresh: list[dict]) -> list[str]:
    """The rows of two frontier CSVs that differ: one line per row whose status, reward, KL or validation
    reward is not the same (floats compared exactly: the runs are deterministic), or that only one has."""
    def index(rows):
        return {tuple(r[k] for k in ROW_KEY): r for r in rows}

    def same(a, b):
        if a == b:
            return True
        try:
            x, y = float(a), float(b)
        except ValueError:
            return False
        return x == y or (math.isnan(x) and math.isnan(y))

    old, new = index(committed), index(fresh)
    out = []
    for key in sorted(old.keys() | new.keys()):
        name = " ".join(f"{k}={v}" for k, v in zip(ROW_KEY, key) if v != "")
        if key not in new or key not in old:
            out.append(f"{name}: only in the {'committed' if key in old else 'new'} rows")
            continue
        diffs = [f"{k} {old[key][k]} -> {new[key][k]}" for k in ROW_VALUES if not same(old[key][k], new[key][k])]
        if diffs:
            out.append(f"{name}: " + ", ".join(diffs))
    return out


def report_frontier(csv_path, out_dir=None) -> None:
    rows = _read(csv_path)
    print(frontier_tables(rows))
    print("\nBest mean reward within a KL budget (setting, its mean KL):\n")
    print(reward_within_kl(rows))
    print()
    print(against_grpo(rows))
    for target in (0.7, 0.8, 0.9):
        print(f"\ntraining seconds to a held-out reward of {target} (mean over seeds; n/r: not reached):")
        for key, hits in time_to_reward(rows, target).items():
            got = [h for h in hits if h is not None]
            cell = f"{statistics.mean(got):.1f} s" if got else "n/r"
            print(f"  {key[0]} {key[1]}={key[2]}: {cell} ({len(got)}/{len(hits)} seeds reached it)")
    for r in rows:
        if r["status"] != "ok":
            print(f"failed: {_series(r)} {r['knob']}={r['value']} seed {r['seed']}: {r['status']}")
    revs = sorted({r.get("revision") or "?" for r in rows})
    print(f"revision: {', '.join(revs)}" + ("  (rows from more than one revision)" if len(revs) > 1 else ""))
    out_dir = Path(out_dir) if out_dir else Path(csv_path).parent
    plot_frontier(rows, out_dir)
    print(f"plots: {out_dir / 'alignment_frontier.png'}, {out_dir / 'alignment_time.png'}")


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
    ap.add_argument("--compare", nargs=2, metavar=("OLD_CSV", "NEW_CSV"),
                    help="print the rows of two frontier CSVs whose status, reward, KL or validation reward differ "
                         "(exit status 1 if any); no training")
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
    ap.add_argument("--suite", choices=("all", "ablation", "frontier", "timing"), default="all",
                    help="ablation: VAR's B / weighting / form against SFT and DPO (alignment.csv); frontier: every "
                         "method at three settings of its main knob, online VAR and GRPO included, learning rates "
                         "from a sweep (alignment_frontier.csv); all: both (default); timing: the online methods' "
                         "wall time, interleaved rounds (alignment_timing.csv; --seeds rounds)")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=None,
                    help=f"frontier suite: learning rates of the offline methods' sweep (default "
                         f"{' '.join(map(str, LR_GRID))}; --quick: --lr)")
    ap.add_argument("--online-lrs", type=float, nargs="+", default=ONLINE_LRS,
                    help=f"frontier suite: the online methods run at each (default {' '.join(map(str, ONLINE_LRS))})")
    ap.add_argument("--methods", nargs="+", default=None, choices=sorted({m for m, _ in FRONTIER}),
                    help="frontier suite: only these methods (default all)")
    args = ap.parse_args(argv)
    if args.compare:
        for path in args.compare:
            if not Path(path).is_file():
                ap.error(f"--compare: no such CSV file: {path}")
        moved = moved_rows(*map(_read, args.compare))
        print("\n".join(moved) or "no row moved")
        return 1 if moved else None
    if args.report:
        if not Path(args.report).is_file():
            ap.error(f"--report: no such CSV file: {args.report}")
        if "frontier" in Path(args.report).name:
            report_frontier(args.report)
        elif "timing" in Path(args.report).name:
            report_timing(args.report)
        else:
            report(args.report)
        return
    if args.lr_grid is None:
        args.lr_grid = (args.lr,) if args.quick else LR_GRID
    for name in ("lr_grid", "online_lrs"):
        if not all(lr > 0 for lr in getattr(args, name)):
            ap.error(f"--{name.replace('_', '-')}: learning rates must be > 0, got {getattr(args, name)}")
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
    if args.suite in ("all", "ablation"):
        run(args)
    if args.suite in ("all", "frontier"):
        run_frontier(args)
    if args.suite == "timing":
        run_timing(args)


if __name__ == "__main__":
    sys.exit(main())
