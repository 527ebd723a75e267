"""Text datasets in TRL's formats (prompt/completion, preference; standard or conversational) → token ids
for ``VARDataset.build``: docs/trainer.md, "VARTrainer from text" (tokenisation, EOS, truncation, drops).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from trl.data_utils import apply_chat_template, is_conversational

logger = logging.getLogger(__name__)

RESPONSE_COLUMNS = {"prompt_completion": ("completion",), "preference": ("chosen", "rejected")}
_TEXT_COLUMNS = {"prompt", "completion", "chosen", "rejected"}


@dataclass
class TextExamples:
    """Tokenised examples of a text dataset, in example order, and what the rewards need."""

    prompts: list = field(default_factory=list)  # 1-D LongTensors
    completions: list = field(default_factory=list)  # 1-D LongTensors (EOS included)
    prompt_texts: list = field(default_factory=list)  # str or messages, as in the dataset
    completion_texts: list = field(default_factory=list)
    columns: dict = field(default_factory=dict)  # other columns, one value per example
    names: list = field(default_factory=list)  # "example 3 (row 1, rejected)"
    dropped: int = 0
    truncated: int = 0
    format: str = "prompt_completion"
    conversational: bool = False

    def __len__(self) -> int:
        return len(self.prompts)


def column_names(dataset) -> list:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    if isinstance(dataset, dict):
        return list(dataset)
    rows = list(dataset)
    return list(rows[0]) if rows else []


def dataset_format(columns, name: str = "train_dataset") -> str:
    """'prompt_completion' or 'preference'; a ValueError naming the columns otherwise."""
    cols = set(columns)
    if {"prompt", "chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    hint = ""
    if {"chosen", "rejected"} <= cols:
        hint = (" (a preference dataset with an implicit prompt: split the shared start of chosen/rejected into a "
                "'prompt' column first, e.g. with trl.data_utils.maybe_extract_prompt)")
    elif cols & {"text", "messages"}:
        hint = (" (language-modelling data has no prompt to condition on: VAR weighs responses to a prompt, so "
                "split each row into 'prompt' and 'completion')")
    raise ValueError(
        f"{name} must be in TRL's prompt/completion format (columns 'prompt', 'completion') or preference format "
        f"('prompt', 'chosen', 'rejected'), standard or conversational; got columns {sorted(cols)}{hint}"
    )


def _rows(dataset):
    if isinstance(dataset, dict):
        keys = list(dataset)
        n = len(dataset[keys[0]]) if keys else 0
        return ({k: dataset[k][r] for k in keys} for r in range(n))
    return iter(dataset)


def _is_messages(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and is_conversational({"prompt": list(x)})


def tokenize_examples(dataset, processing_class, *, max_length: Optional[int] = None,
                      max_prompt_length: Optional[int] = None, max_completion_length: Optional[int] = None,
                      vocab_size: Optional[int] = None, name: str = "train_dataset",
                      chat_template_kwargs: Optional[dict] = None) -> TextExamples:
    """Tokenise a TRL-format text dataset (module docstring); one :class:`TextExamples` entry per example."""
    tok = processing_class
    if tok is None:
        raise ValueError(f"{name} holds text: pass processing_class (the policy's tokenizer) to tokenise it")
    fmt = dataset_format(column_names(dataset), name)
    eos = tok.eos_token_id
    out = TextExamples(format=fmt)
    kw = dict(chat_template_kwargs or {})
    extra_cols = None
    for r, row in enumerate(_rows(dataset)):
        if extra_cols is None:
            extra_cols = [c for c in row if c not in _TEXT_COLUMNS]
            out.columns = {c: [] for c in extra_cols}
        prompt = row["prompt"]
        conversational = _is_messages(prompt)
        out.conversational |= conversational
        if not conversational:
            if not isinstance(prompt, str):
                raise TypeError(f"{name} row {r}: 'prompt' must be a string or a list of messages, "
                                f"got {type(prompt).__name__}")
            prompt_ids = list(tok(prompt)["input_ids"])
        for col in RESPONSE_COLUMNS[fmt]:
            k = len(out.prompts) + out.dropped
            label = f"example {k} ({name} row {r}" + (f", {col})" if fmt == "preference" else ")")
            completion = row[col]
            if conversational != _is_messages(completion):
                raise ValueError(f"{label}: the prompt and the {col!r} must both be conversational or both strings")
            if conversational:  # TRL's split of the chat template into prompt (with generation prompt) and completion
                text = apply_chat_template({"prompt": list(prompt), "completion": list(completion)}, tok, **kw)
                prompt_ids = list(tok(text["prompt"], add_special_tokens=False)["input_ids"])
                completion_ids = list(tok(text["completion"], add_special_tokens=False)["input_ids"])
            else:
                if not isinstance(completion, str):
                    raise TypeError(f"{label}: {col!r} must be a string, got {type(completion).__name__}")
                completion_ids = list(tok(completion, add_special_tokens=False)["input_ids"])
            if eos is not None and (not completion_ids or completion_ids[-1] != eos):
                completion_ids = completion_ids + [eos]
            p_ids = prompt_ids[-max_prompt_length:] if max_prompt_length else list(prompt_ids)
            c_ids = completion_ids[:max_completion_length] if max_completion_length else completion_ids
            if max_length is not None and len(p_ids) + len(c_ids) > max_length:
                c_ids = c_ids[: max(0, max_length - len(p_ids))]
            if len(p_ids) < len(prompt_ids) or len(c_ids) < len(completion_ids):
                out.truncated += 1
            if not p_ids:
                raise ValueError(
                    f"{label}: the prompt tokenises to no tokens; a prompt needs at least one (e.g. BOS) to predict "
                    "the first completion token"
                )
            if not c_ids:
                out.dropped += 1
                continue
            for what, ids in (("prompt", p_ids), (col, c_ids)):
                bad = [t for t in ids if vocab_size is not None and not 0 <= t < vocab_size]
                if bad:
                    raise ValueError(
                        f"{label}: the {what} has token id {bad[0]} outside the model's vocabulary "
                        f"[0, {vocab_size}) (is processing_class the policy's tokenizer?)"
                    )
            out.prompts.append(torch.tensor(p_ids, dtype=torch.long))
            out.completions.append(torch.tensor(c_ids, dtype=torch.long))
            out.prompt_texts.append(prompt)
            out.completion_texts.append(completion)
            out.names.append(label)
            for c in extra_cols:
                out.columns[c].append(row.get(c))
    total = len(out.prompts) + out.dropped
    if out.dropped:
        logger.warning(
            "%s: dropped %d of %d examples whose completion has no token left after truncation (fully masked: "
            "nothing to train on; max_length=%s, max_prompt_length=%s, max_completion_length=%s)",
            name, out.dropped, total, max_length, max_prompt_length, max_completion_length,
        )
    if out.truncated:
        logger.info("%s: truncated %d of %d examples", name, out.truncated, total)
    if not out.prompts:
        raise ValueError(f"{name}: no example left to train on ({out.dropped} dropped by truncation, of {total})")
    return out
