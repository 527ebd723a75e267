"""TRL's reward contract on text (GRPOTrainer, TRL 1.16), for the offline and the online VAR trainers:
callables ``f(prompts, completions, **kwargs) -> list[float | None]``, sequence-classification reward models
and lists of them weighted by ``reward_weights``. docs/trainer.md, "Reward functions: TRL's contract".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from .._validation import FP32_MAX, check_positive_int
from .lm_head import _model_device, _vocab_size, unwrap_model

Describe = Callable[[int], str]


def describe_pairs(pairs: Sequence[tuple], names: Optional[list] = None, response: str = "response") -> Describe:
    """``describe(k)``: the (prompt i, response j) pair k of ``pairs`` in words, by the examples' ``names``."""
    name = names.__getitem__ if names is not None else "example {}".format

    def describe(k: int) -> str:
        i, j = pairs[k]
        return name(i) if i == j else f"the prompt of {name(i)} with the {response} of {name(j)}"

    return describe


def reward_name(func) -> str:
    """The name TRL logs a reward under: a model's ``_name_or_path`` tail, a callable's ``__name__``."""
    if isinstance(func, torch.nn.Module):
        path = getattr(getattr(func, "config", None), "_name_or_path", "")
        return str(path).rstrip("/").split("/")[-1] or type(func).__name__
    while callable(getattr(func, "func", None)):  # functools.partial (as trl's get_callable_name)
        func = func.func
    return getattr(func, "__name__", None) or type(func).__name__


def call_reward_func(func, name: str, *args, **kwargs):
    """``func(*args, **kwargs)``; a function that refuses a keyword of the reward contract (no ``**kwargs``)
    gets a ``TypeError`` naming it and saying what to add, instead of Python's bare one."""
    try:
        return func(*args, **kwargs)
    except TypeError as e:
        try:
            params = inspect.signature(func).parameters
        except (TypeError, ValueError):
            raise e from None
        if any(p.kind is p.VAR_KEYWORD for p in params.values()) or all(k in params for k in kwargs):
            raise
        unknown = [k for k in kwargs if k not in params]
        raise TypeError(
            f"reward function {name!r} does not accept the keyword argument(s) {unknown}: reward functions are "
            f"called as f(prompts=..., completions=..., **kwargs) with completion_ids and the dataset's other "
            f"columns (TRL's contract); add **kwargs to its signature"
        ) from e


def as_scores(values, n: int, *, name: str, describe: Describe = "pair {}".format) -> torch.Tensor:
    """A reward function's output as float32 [n], NaN where it returned ``None``; ``ValueError`` / ``TypeError``
    naming the function and the example for a wrong length, a value that is not a real number, a NaN / ±inf."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # tensors, numpy arrays
        values = values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"reward function {name!r} must return a list of floats (or None), one per (prompt, "
                        f"completion) pair; got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {n} (prompt, completion) "
                         "pairs; it must return one score per pair (None for 'no reward')")
    out = [math.nan] * n
    for k, v in enumerate(values):
        if v is None:
            continue
        if hasattr(v, "item") and not isinstance(v, (str, bytes)) and math.prod(getattr(v, "shape", ())) == 1:
            v = v.item()  # a one-element tensor, a numpy number
        if not isinstance(v, (int, float)):  # a bool is 0 or 1, as for TRL
            raise TypeError(f"reward function {name!r} returned {type(v).__name__} {v!r:.60} for {describe(k)}; "
                            "expected a real number (or None for 'no reward')")
        if not abs(v) <= FP32_MAX:  # NaN, ±inf, or inf as the float32 the rewards are kept in
            raise ValueError(f"reward function {name!r} returned a non-finite score {v} for {describe(k)}; return a "
                             "finite float (float32: |r| <= 3.4e38), or None when it gives no reward for this pair")
        out[k] = float(v)
    return torch.tensor(out, dtype=torch.float32)


def _absent_id(seqs: Sequence[torch.Tensor], vocab_size: Optional[int]) -> int:
    used = set(torch.cat([s.reshape(-1) for s in seqs]).tolist())
    top = vocab_size or max(used) + 2
    # every id of the vocabulary occurs: an id past it is never read (masked)
    return next((c for c in range(top - 1, -1, -1) if c not in used), top)


@torch.no_grad()
def classifier_scores(model: torch.nn.Module, seqs: Sequence[torch.Tensor], *, batch_size: Optional[int] = None,
                      pad_token_id: Optional[int] = None, bar=None) -> torch.Tensor:
    """Scores of a sequence-classification model (``num_labels=1``) for N 1-D token sequences: float32 [N] on CPU.
    Length-sorted, right-padded batches of ``batch_size`` (default N), padded with ``pad_token_id``, the model's,
    or an id no sequence of the batch holds (set for the call only): docs/trainer.md, "Reward functions".
    """
    check_positive_int("batch_size", batch_size, allow_none=True)
    n, lm = len(seqs), unwrap_model(model)
    config = getattr(lm, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    saved = getattr(config, "pad_token_id", None)
    own_pad = pad_token_id if pad_token_id is not None else saved
    bs, device = batch_size or max(n, 1), _model_device(model)
    order = sorted(range(n), key=lambda k: seqs[k].numel())
    out = torch.empty(n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, bs):
            batch = order[start : start + bs]
            chunk = [seqs[k].long() for k in batch]
            pad = own_pad if own_pad is not None else _absent_id(chunk, _vocab_size(lm))
            if config is not None:
                config.pad_token_id = pad
            ids = pad_sequence(chunk, batch_first=True, padding_value=pad)
            mask = pad_sequence([torch.ones_like(s) for s in chunk], batch_first=True)
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
        if config is not None:
            config.pad_token_id = saved
        model.train(was_training)
    return out


class RewardFunctions:
    """``reward_funcs`` / ``reward_weights`` / ``reward_processing_classes`` as TRL's GRPOTrainer takes them;
    ``model_init_kwargs`` go to ``from_pretrained`` for the functions given as paths, and ``batch_size`` is the
    number of sequences per reward-model forward (default: all pairs of a call)."""

    def __init__(self, reward_funcs, reward_weights=None, reward_processing_classes=None, *,
                 model_init_kwargs: Optional[dict] = None, batch_size: Optional[int] = None):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs must hold at least one reward function or model, got an empty list")
        procs = reward_processing_classes
        procs = [None] * len(funcs) if procs is None else list(procs) if isinstance(procs, (list, tuple)) else [procs]
        weights = [1.0] * len(funcs) if reward_weights is None else list(reward_weights)
        for arg, vals, unit in (("reward_processing_classes", procs, "entry"), ("reward_weights", weights, "weight")):
            if len(vals) != len(funcs):
                raise ValueError(f"{arg} must have one {unit} per reward function ({len(funcs)}), got {len(vals)}")
        for i, f in enumerate(funcs):
            if isinstance(f, str):  # as GRPOTrainer loads it
                from transformers import AutoModelForSequenceClassification

                funcs[i] = AutoModelForSequenceClassification.from_pretrained(
                    f, num_labels=1, **(model_init_kwargs or {})).eval()
            if isinstance(funcs[i], torch.nn.Module):
                procs[i] = procs[i] if procs[i] is not None else _tokenizer_of(funcs[i], i)
            elif not callable(f):
                raise TypeError(
                    f"reward_funcs[{i}] must be a callable f(prompts, completions, **kwargs) -> list[float | None], "
                    f"a sequence-classification model or a path to one; got {type(f).__name__}"
                )
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"reward_weights[{i}] must be a finite number, got {w!r}")
        check_positive_int("batch_size", batch_size, allow_none=True)
        self.funcs, self.processing_classes, self.batch_size = funcs, procs, batch_size
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.names = [reward_name(f) for f in funcs]

    def __len__(self) -> int:
        return len(self.funcs)

    def per_function(self, prompts: list, completions: list, *, columns: Optional[dict] = None,
                     completion_ids: Optional[list] = None, describe: Describe = "pair {}".format) -> torch.Tensor:
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
                values = call_reward_func(func, name, prompts=list(prompts), completions=list(completions), **kwargs)
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
        from trl.data_utils import apply_chat_template, is_conversational  # GRPOTrainer's text for reward models

        texts = [apply_chat_template({"messages": list(p) + list(c)}, tok)["text"]
                 if is_conversational({"prompt": p}) or is_conversational({"completion": c}) else p + c
                 for p, c in zip(prompts, completions)]
        seqs = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
        for k, s in enumerate(seqs):
            if s.numel() == 0:
                raise ValueError(f"reward model {reward_name(model)!r}: the text of pair {k} tokenises to no tokens")
        return classifier_scores(model, seqs, batch_size=self.batch_size)


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
    """:class:`RewardFunctions` bound to N text examples: ``score_pairs`` (what ``VARDataset.build`` calls for a
    group's pairs) gives the pair (i, j) the prompt and the columns of example i and the completion of j."""

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

    def score_pairs(self, pairs: Sequence[tuple]) -> torch.Tensor:
        pairs = [(int(i), int(j)) for i, j in pairs]
        describe = describe_pairs(pairs, self.example_names, "completion")
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
