"""TRL's reward contract on text, for the offline and the online VAR trainers.

The contract of TRL's ``GRPOTrainer`` (TRL 1.16), unchanged, so the reward functions and
models a GRPO user already has work as they are:

- a **callable** ``f(prompts, completions, **columns) -> list[float | None]``: ``prompts`` and
  ``completions`` are strings (standard data) or lists of messages (conversational data: each
  completion is ``[{"role": "assistant", "content": ...}]``); ``columns`` holds the dataset's other
  columns, one value per pair, and ``completion_ids`` (the completion's token ids in the policy's
  tokenizer). Write it with ``**kwargs`` to ignore what it does not use.
- a **sequence-classification reward model** (``num_labels=1``), as an instance or a path / hub id
  (loaded with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
  **model_init_kwargs)``), with its own tokenizer (``reward_processing_classes[i]``; for a path or
  a model with ``config._name_or_path``, loaded from there when not given). The text
  ``prompt + completion`` (conversational: the reward tokenizer's chat template over
  ``prompt + completion``) is tokenised by that tokenizer (no special tokens added, as TRL does)
  and scored in length-sorted batches, padded with the reward model's own pad token. A model
  without ``pad_token_id`` is still scored in batches: the batch is padded with an id that none
  of its sequences holds, set as the model's ``pad_token_id`` for the call only, so the score is
  read at each sequence's last token, as an unpadded call would.
- a **list** of them, combined as ``Σ_f w_f · r_f`` with ``reward_weights`` (default all 1).

``None`` means what it means in TRL: "this function gives no reward for this pair" — the
weighted sum skips it (``nansum``). When **every** function returns ``None`` for a pair, TRL's
GRPO warns and leaves that completion out of its group statistics; VAR needs a reward for every
(prompt, completion) pair of a group, so :class:`TextPairRewards` raises a ``ValueError`` naming
the example(s) and the functions. A NaN or ±inf reward, a value that is not a number (a string,
a list) and a list of the wrong length are errors naming the function and the example.

``RewardFunctions`` is what a trainer builds once from ``reward_funcs`` / ``reward_weights`` /
``reward_processing_classes``; ``per_function`` scores any list of (prompt, completion) pairs and
``combine`` weights them, so an online trainer calls it on its generations as the offline
trainer does on its B² cross pairs (:class:`TextPairRewards`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Callable, Optional

import torch

from .._validation import check_positive_int
from .lm_head import _model_device, _vocab_size, unwrap_model

Describe = Callable[[int], str]


def _default_describe(k: int) -> str:
    return f"pair {k}"


def reward_name(func) -> str:
    """The name TRL logs a reward under: a model's ``_name_or_path`` tail, a callable's ``__name__``."""
    if isinstance(func, torch.nn.Module):
        config = getattr(func, "config", None)
        path = getattr(config, "_name_or_path", "") or type(func).__name__
        return str(path).rstrip("/").split("/")[-1] or type(func).__name__
    inner = getattr(func, "func", None)  # functools.partial
    if inner is not None and callable(inner):
        return reward_name(inner)
    return getattr(func, "__name__", None) or type(func).__name__


def as_scores(values, n: int, *, name: str, describe: Describe = _default_describe) -> torch.Tensor:
    """A reward function's output as float32 [n], with NaN where it returned ``None``.

    Raises ``ValueError`` / ``TypeError`` naming the function and the example for a wrong length,
    a value that is not a real number, or a NaN / ±inf.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().float().reshape(-1).cpu().tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(
            f"reward function {name!r} must return a list of floats (or None), one per (prompt, completion) pair; "
            f"got {type(values).__name__}"
        )
    if len(values) != n:
        raise ValueError(
            f"reward function {name!r} returned {len(values)} rewards for {n} (prompt, completion) pairs; it must "
            "return one score per pair (None for 'no reward')"
        )
    out = torch.empty(n, dtype=torch.float32)
    for k, v in enumerate(values):
        if v is None:
            out[k] = math.nan
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        elif hasattr(v, "item") and not isinstance(v, (str, bytes)) and getattr(v, "size", 1) == 1:
            v = v.item()  # numpy scalars
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(
                f"reward function {name!r} returned {type(v).__name__} {v!r:.60} for {describe(k)}; "
                "expected a real number (or None for 'no reward')"
            )
        if not math.isfinite(v):
            raise ValueError(
                f"reward function {name!r} returned a non-finite score {v} for {describe(k)}; return a finite "
                "float, or None when the function gives no reward for this pair"
            )
        out[k] = float(v)
    return out


def _absent_id(seqs: Sequence[torch.Tensor], vocab_size: Optional[int]) -> int:
    used = torch.unique(torch.cat([s.reshape(-1) for s in seqs])).tolist()
    used = set(used)
    top = vocab_size if vocab_size else max(used) + 2
    for cand in range(top - 1, -1, -1):
        if cand not in used:
            return cand
    return top  # every id of the vocabulary occurs: an id past it is never read (masked)


def _text_config(model):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


@torch.no_grad()
def classifier_scores(
    model: torch.nn.Module,
    seqs: Sequence[torch.Tensor],
    *,
    batch_size: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    bar=None,
) -> torch.Tensor:
    """Scores of a sequence-classification model (``num_labels=1``) for N 1-D token sequences.

    Length-sorted, right-padded batches of ``batch_size`` (default N). The pad id is
    ``pad_token_id``, else the model's ``config.pad_token_id``; a model with neither gets an id
    that no sequence of the batch holds, set as its ``pad_token_id`` for the call and restored
    after (transformers reads the score at the last token that is not the pad id, and refuses
    batches without one). Returns float32 [N] on CPU.
    """
    n = len(seqs)
    check_positive_int("batch_size", batch_size, allow_none=True)
    bs = batch_size or max(n, 1)
    config = _text_config(unwrap_model(model))
    own_pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    vocab = _vocab_size(unwrap_model(model))
    device = _model_device(model)
    order = sorted(range(n), key=lambda k: seqs[k].numel())
    out = torch.empty(n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    saved = getattr(config, "pad_token_id", None) if config is not None else None
    try:
        for start in range(0, n, bs):
            batch = order[start : start + bs]
            chunk = [seqs[k].long() for k in batch]
            pad = own_pad
            if pad is None:
                pad = _absent_id(chunk, vocab)
                if config is not None:
                    config.pad_token_id = pad
            L = max(s.numel() for s in chunk)
            ids = torch.full((len(chunk), L), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for r, s in enumerate(chunk):
                ids[r, : s.numel()] = s
                mask[r, : s.numel()] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if logits.dim() != 2 or logits.shape[1] != 1:
                raise ValueError(
                    "reward model must output one score per sequence (num_labels=1, logits [N, 1]), "
                    f"got logits of shape {tuple(logits.shape)}"
                )
            out[torch.tensor(batch)] = logits[:, 0].float().cpu()
            if bar is not None:
                bar.update(len(batch))
    finally:
        if config is not None and own_pad is None:
            config.pad_token_id = saved
        model.train(was_training)
    return out


def is_conversational(x) -> bool:
    """A prompt or completion in TRL's conversational form: a list of {"role", "content"} dicts."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


class RewardFunctions:
    """``reward_funcs`` / ``reward_weights`` / ``reward_processing_classes`` as TRL's GRPOTrainer takes them.

    Args:
        reward_funcs: a callable, a sequence-classification model, a path / hub id of one, or a list.
        reward_weights: one float per function (default all 1).
        reward_processing_classes: one tokenizer (or None) per function; only models read theirs.
        model_init_kwargs: passed to ``from_pretrained`` for the functions given as paths.
        batch_size: sequences per reward-model forward (default: all pairs of a call).
    """

    def __init__(self, reward_funcs, reward_weights=None, reward_processing_classes=None, *,
                 model_init_kwargs: Optional[dict] = None, batch_size: Optional[int] = None):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs must hold at least one reward function or model, got an empty list")
        procs = reward_processing_classes
        procs = [None] * len(funcs) if procs is None else list(procs) if isinstance(procs, (list, tuple)) else [procs]
        if len(procs) != len(funcs):
            raise ValueError(
                f"reward_processing_classes must have one entry per reward function ({len(funcs)}), got {len(procs)}"
            )
        for i, f in enumerate(funcs):
            if isinstance(f, str):
                funcs[i], loaded_tok = _load_reward_model(f, model_init_kwargs)
                procs[i] = procs[i] if procs[i] is not None else loaded_tok
            elif isinstance(f, torch.nn.Module):
                if procs[i] is None:
                    procs[i] = _tokenizer_of(f, i)
            elif not callable(f):
                raise TypeError(
                    f"reward_funcs[{i}] must be a callable f(prompts, completions, **columns) -> list[float | None], "
                    f"a sequence-classification model or a path to one; got {type(f).__name__}"
                )
        if reward_weights is None:
            weights = [1.0] * len(funcs)
        else:
            weights = list(reward_weights)
            if len(weights) != len(funcs):
                raise ValueError(
                    f"reward_weights must have one weight per reward function ({len(funcs)}), got {len(weights)}"
                )
            for i, w in enumerate(weights):
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                    raise ValueError(f"reward_weights[{i}] must be a finite number, got {w!r}")
        self.funcs, self.processing_classes = funcs, procs
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.names = [reward_name(f) for f in funcs]
        check_positive_int("batch_size", batch_size, allow_none=True)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.funcs)

    def per_function(self, prompts: list, completions: list, *, columns: Optional[dict] = None,
                     completion_ids: Optional[list] = None, describe: Describe = _default_describe) -> torch.Tensor:
        """[N, F] float32: reward function f on pair n, NaN where it returned None."""
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(f"prompts and completions must have one length, got {n} and {len(completions)}")
        out = torch.empty((n, len(self.funcs)), dtype=torch.float32)
        kwargs = dict(columns or {})
        if completion_ids is not None:
            kwargs["completion_ids"] = completion_ids
        for f_idx, (func, tok, name) in enumerate(zip(self.funcs, self.processing_classes, self.names)):
            if isinstance(func, torch.nn.Module):
                out[:, f_idx] = self._model_scores(func, tok, prompts, completions)
            else:
                values = func(prompts=list(prompts), completions=list(completions), **kwargs)
                out[:, f_idx] = as_scores(values, n, name=name, describe=describe)
        return out

    def combine(self, per_function: torch.Tensor) -> torch.Tensor:
        """[N]: Σ_f w_f · r_f over the functions that gave a reward; NaN where none did."""
        none = torch.isnan(per_function).all(dim=1)
        total = (per_function * self.weights.to(per_function.device)).nansum(dim=1)
        return total.masked_fill(none, math.nan)

    def __call__(self, prompts, completions, **columns) -> torch.Tensor:
        ids = columns.pop("completion_ids", None)
        return self.combine(self.per_function(prompts, completions, columns=columns, completion_ids=ids))

    def _model_scores(self, model, tok, prompts, completions) -> torch.Tensor:
        texts = []
        for p, c in zip(prompts, completions):
            if is_conversational(p) or is_conversational(c):
                texts.append(tok.apply_chat_template(list(p) + list(c), tokenize=False))
            else:
                texts.append(p + c)
        seqs = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
        for k, s in enumerate(seqs):
            if s.numel() == 0:
                raise ValueError(f"reward model {reward_name(model)!r}: the text of pair {k} tokenises to no tokens")
        return classifier_scores(model, seqs, batch_size=self.batch_size, pad_token_id=None)

    def fingerprint(self) -> Optional[str]:
        """Identity of the functions, models (weights), tokenizers and weights; None if a part has none."""
        from .cache import fingerprint_reward, fingerprint_value

        parts = []
        for f, tok in zip(self.funcs, self.processing_classes):
            fp = fingerprint_reward(f)
            if fp is None:
                return None
            parts.append(fp)
            if tok is not None:
                tok_fp = fingerprint_value(tok)
                if tok_fp is None:
                    return None
                parts.append(tok_fp)
        parts.append(repr(self.weights.tolist()))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def explain_unfingerprintable(self) -> str:
        from .cache import explain_unfingerprintable

        for f in self.funcs:
            why = explain_unfingerprintable(f)
            if why:
                return f"reward function {reward_name(f)!r}: {why}"
        return ""


def _load_reward_model(path: str, model_init_kwargs: Optional[dict]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kwargs = dict(model_init_kwargs or {})
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _tokenizer_of(model, i: int):
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if path:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - any failure means: ask for it
            pass
    raise ValueError(
        f"reward_funcs[{i}] is a reward model ({type(model).__name__}) with no tokenizer to load from its "
        f"config._name_or_path ({path!r}): pass its tokenizer as reward_processing_classes[{i}]"
    )


class TextPairRewards:
    """:class:`RewardFunctions` bound to N text examples; scores (prompt of i, completion of j) pairs.

    What ``VARDataset.build`` calls for the B² cross pairs of a group (``score_pairs``). The pair
    (i, j) gets the prompt and the columns of example i (a column such as a reference answer
    belongs to the prompt, as in GRPO, where every completion of a prompt gets its row's columns)
    and the completion and ``completion_ids`` of example j.
    """

    def __init__(self, rewards: RewardFunctions, prompts: list, completions: list, *,
                 columns: Optional[dict] = None, completion_ids: Optional[list] = None,
                 example_names: Optional[list] = None):
        n = len(prompts)
        self.rewards, self.prompts, self.completions = rewards, list(prompts), list(completions)
        self.columns = {k: list(v) for k, v in (columns or {}).items()}
        for k, v in self.columns.items():
            if len(v) != n:
                raise ValueError(f"column {k!r} must have one value per example ({n}), got {len(v)}")
        self.completion_ids = completion_ids
        self.example_names = example_names or [f"example {k}" for k in range(n)]

    def _describe_pair(self, pairs):
        def describe(k):
            i, j = pairs[k]
            if i == j:
                return self.example_names[i]
            return f"the prompt of {self.example_names[i]} with the completion of {self.example_names[j]}"

        return describe

    def score_pairs(self, pairs: Sequence[tuple]) -> torch.Tensor:
        pairs = [(int(i), int(j)) for i, j in pairs]
        describe = self._describe_pair(pairs)
        prompts = [self.prompts[i] for i, _ in pairs]
        completions = [self.completions[j] for _, j in pairs]
        columns = {k: [v[i] for i, _ in pairs] for k, v in self.columns.items()}
        ids = [self.completion_ids[j] for _, j in pairs] if self.completion_ids is not None else None
        per_f = self.rewards.per_function(prompts, completions, columns=columns, completion_ids=ids, describe=describe)
        total = self.rewards.combine(per_f)
        missing = torch.isnan(total)
        if missing.any():
            k = int(missing.nonzero()[0])
            raise ValueError(
                f"every reward function ({', '.join(repr(n) for n in self.rewards.names)}) returned None for "
                f"{describe(k)}: VAR needs a reward for every (prompt, completion) pair of a group (TRL's GRPO "
                "leaves such a completion out of its statistics; here drop the example or let one function score it)"
            )
        return total

    def fingerprint(self) -> Optional[str]:
        fp = self.rewards.fingerprint()
        if fp is None:
            return None
        h = hashlib.sha256(fp.encode())
        h.update(json.dumps([self.prompts, self.completions, self.columns], default=str, sort_keys=True).encode())
        if self.completion_ids is not None:
            h.update(json.dumps([list(map(int, c)) for c in self.completion_ids]).encode())
        return h.hexdigest()

    def explain_unfingerprintable(self) -> str:
        return self.rewards.explain_unfingerprintable()
