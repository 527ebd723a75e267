"""End-to-end VAR alignment of a tiny Llama on a synthetic language, on CPU in under a minute.

1. A synthetic language: a prompt is ``BOS <color> a b c SEP`` (one of 4 color markers and three
   random content tokens); a response is 3-10 content tokens then EOS, each from a Markov chain
   over the 24 content tokens or, with probability 1/4, a token of the marker's color (each
   content token has one of the 4 colors).
2. A tiny Llama (random init from a config) is pre-trained on that language: the reference π_ref.
3. The reference samples responses for training prompts; a programmatic reward scores them:
   r(x, y) = fraction of the content tokens of y that have the color of x's marker (≈ 0.45 for the
   reference).
4. ``VARDataset.build`` forms fixed groups of B = 8, scores R[i, j] = r(x_i, y_j) and
   Q[i, j] = log π_ref(y_j | x_i) (prefix-shared KV cache), and caches them.
5. ``VARTrainer`` trains the policy (initialised from the reference) with the fused-linear VAR loss.
6. Both models sample fresh responses for held-out prompts; the last line prints their mean reward.

Run: ``python examples/toy_alignment.py`` (45 s wall on 2 CPU cores shared with other jobs, 2026-11-29).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

from varkernels.training.data import VARDataset  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer  # noqa: E402

PAD, BOS, EOS, SEP = 0, 1, 2, 3
N_COLORS = 4
MARKERS = list(range(4, 4 + N_COLORS))  # one marker token per color
CONTENT = list(range(8, 32))  # 24 content tokens; color of token t = (t - 8) % 4
VOCAB = 32
PROMPT_LEN = 6
MAX_NEW = 11
MARKER_PULL = 0.25  # how much the reference language already follows the prompt's color


def color(tok: torch.Tensor) -> torch.Tensor:
    return (tok - CONTENT[0]) % N_COLORS


class Language:
    """The synthetic language: prompts, and a Markov chain over content tokens for responses."""

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        n = len(CONTENT)
        self.start = torch.distributions.Dirichlet(torch.full((n,), 0.5)).sample()
        self.trans = torch.distributions.Dirichlet(torch.full((n,), 0.3)).sample((n,))

    def prompts(self, count: int) -> list[torch.Tensor]:
        marks = torch.randint(0, N_COLORS, (count,), generator=self.g)
        words = torch.randint(0, len(CONTENT), (count, 3), generator=self.g) + CONTENT[0]
        return [torch.tensor([BOS, MARKERS[int(m)], *w.tolist(), SEP]) for m, w in zip(marks, words)]

    def responses(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """One response per prompt: 3-10 content tokens then EOS. Each token follows the chain,
        or with probability ``MARKER_PULL`` is drawn uniformly from the prompt marker's color."""
        n, per_color = len(prompts), len(CONTENT) // N_COLORS
        want = torch.tensor([int(x[1]) - MARKERS[0] for x in prompts])
        lengths = torch.randint(3, MAX_NEW, (n,), generator=self.g)
        toks = torch.empty(n, MAX_NEW - 1, dtype=torch.long)
        probs = self.start.expand(n, -1)
        for t in range(MAX_NEW - 1):
            chain = torch.multinomial(probs, 1, generator=self.g).squeeze(1)
            pulled = want + N_COLORS * torch.randint(0, per_color, (n,), generator=self.g)
            k = torch.where(torch.rand(n, generator=self.g) < MARKER_PULL, pulled, chain)
            toks[:, t] = k
            probs = self.trans[k]
        return [torch.cat([toks[r, : lengths[r]] + CONTENT[0], torch.tensor([EOS])]) for r in range(n)]


def reward(prompts: list[torch.Tensor], responses: list[torch.Tensor]) -> list[float]:
    """r(x, y): fraction of y's content tokens whose color is x's marker color (0 if none)."""
    out = []
    for x, y in zip(prompts, responses):
        want = int(x[1]) - MARKERS[0]
        content = y[y >= CONTENT[0]]
        out.append(float((color(content) == want).float().mean()) if content.numel() else 0.0)
    return out


def tiny_llama() -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg)


def pretrain(model, lang: Language, steps: int, batch: int = 64) -> float:
    """Plain next-token training on response tokens of the synthetic language."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        xs = lang.prompts(batch)
        seqs = [torch.cat([x, y]) for x, y in zip(xs, lang.responses(xs))]
        T = max(len(s) for s in seqs)
        ids = torch.full((batch, T), PAD)
        labels = torch.full((batch, T), -100)
        mask = torch.zeros((batch, T), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
            labels[r, PROMPT_LEN : len(s)] = s[PROMPT_LEN:]
            mask[r, : len(s)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def sample(model, prompts: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """One sampled response per prompt (temperature 1, no top-k), cut after the first EOS."""
    torch.manual_seed(seed)
    model.eval()
    ids = torch.stack(prompts)  # every prompt has PROMPT_LEN tokens: no padding needed
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        max_new_tokens=MAX_NEW, eos_token_id=EOS, pad_token_id=PAD,
    )[:, PROMPT_LEN:]
    responses = []
    for row in out:
        eos = (row == EOS).nonzero()
        responses.append(row[: int(eos[0]) + 1] if len(eos) else row)
    return responses


def mean_reward(model, prompts, seed) -> float:
    return sum(reward(prompts, sample(model, prompts, seed))) / len(prompts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--train-prompts", type=int, default=1024)
    ap.add_argument("--eval-prompts", type=int, default=512)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: the models are tiny, and spinning OpenMP threads on a "
                         "busy 2-core machine made each step >10x slower")
    ap.add_argument("--cache-dir", default=None, help="where R/Q are cached (default: a temporary directory)")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    logging.getLogger("varkernels").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    lang = Language(args.seed)

    reference = tiny_llama()
    loss = pretrain(reference, lang, args.pretrain_steps)
    print(f"[{time.time() - t0:5.1f}s] reference pre-trained: final loss {loss:.3f}")

    train_prompts = lang.prompts(args.train_prompts)
    eval_prompts = lang.prompts(args.eval_prompts)  # held out: never seen in training
    responses = sample(reference, train_prompts, seed=args.seed + 1)
    print(f"[{time.time() - t0:5.1f}s] sampled {len(responses)} training responses; "
          f"mean reward {sum(reward(train_prompts, responses)) / len(responses):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = args.cache_dir or os.path.join(tmp, "scores")
        dataset = VARDataset.build(
            train_prompts, responses, ref_model=reference, reward=reward, group_size=8, seed=args.seed,
            cache_dir=cache_dir, pad_token_id=PAD, batch_size=64, progress=False,
        )
        print(f"[{time.time() - t0:5.1f}s] scored {len(dataset)} groups of 8 (R and Q are 8x8 per group)")

        policy = copy.deepcopy(reference)
        config = VARConfig(
            output_dir=os.path.join(tmp, "out"), beta=args.beta, per_device_train_batch_size=2,
            num_train_epochs=args.epochs, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=10,
            weight_decay=0.0, logging_steps=20, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
            disable_tqdm=True,
        )
        trainer = VARTrainer(model=policy, args=config, train_dataset=dataset)
        trainer.train()
        last = [h for h in trainer.state.log_history if "var/ess" in h][-1]
        print(f"[{time.time() - t0:5.1f}s] VAR training done: loss {last['loss']:.3f}, "
              f"ESS {last['var/ess']:.2f}/8, weights in [{last['var/weights_min']:.3f}, {last['var/weights_max']:.3f}]")

    ref_r = mean_reward(reference, eval_prompts, seed=args.seed + 2)
    pol_r = mean_reward(policy, eval_prompts, seed=args.seed + 2)
    print(f"[{time.time() - t0:5.1f}s] evaluated on {len(eval_prompts)} held-out prompts")
    print(f"mean reward: reference {ref_r:.3f} -> policy {pol_r:.3f}")


if __name__ == "__main__":
    main()
