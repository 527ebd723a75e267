"""The toy alignment task shared by the examples: a synthetic language, a programmatic reward and a
tiny Llama pre-trained on that language as the reference policy.

- A prompt is ``BOS <color> a b c SEP`` (one of 4 color markers and three random content tokens);
  a response is 3-10 content tokens then EOS, each from a Markov chain over the 24 content tokens
  or, with probability ``MARKER_PULL``, a token of the marker's color (each content token has one
  of the 4 colors).
- ``reward(x, y)`` = fraction of the content tokens of y that have the color of x's marker (about
  0.45 for the pre-trained reference).
- ``tiny_llama()`` is a 2-layer Llama built from a config (random init, 78k parameters);
  ``pretrain`` fits it to the language; ``sample`` draws one response per prompt.

Used by ``toy_alignment.py`` (one VAR run) and ``compare_methods.py`` (VAR against SFT and DPO).
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

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
def sample(model, prompts: list[torch.Tensor], seed: int, max_new: int = MAX_NEW) -> list[torch.Tensor]:
    """One sampled response per prompt (temperature 1, no top-k, at most ``max_new`` tokens), cut
    after the first EOS."""
    torch.manual_seed(seed)
    model.eval()
    ids = torch.stack(prompts)  # every prompt has PROMPT_LEN tokens: no padding needed
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
        max_new_tokens=max_new, eos_token_id=EOS, pad_token_id=PAD,
    )[:, PROMPT_LEN:]
    responses = []
    for row in out:
        eos = (row == EOS).nonzero()
        responses.append(row[: int(eos[0]) + 1] if len(eos) else row)
    return responses


def mean_reward(model, prompts, seed) -> float:
    return sum(reward(prompts, sample(model, prompts, seed))) / len(prompts)
