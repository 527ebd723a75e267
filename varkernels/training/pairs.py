"""Cross-pair scoring: R[i, j] = r(x_i, y_j) and Q[i, j] = log π_ref(y_j | x_i), [B, B] float32, and their
diagonals. Prefix sharing (one KV cache per prompt) and the no-logits log-prob path: docs/trainer.md,
"Cross-pair scoring".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from .._validation import REDUCTIONS, check_option, check_positive_int
from .lm_head import LMHead, _model_device, _vocab_size, output_cache, unwrap_model
from .rewards import as_scores, classifier_scores, describe_pairs, reward_name

PROGRESS_MIN_PAIRS = 256  # progress=None shows a tqdm bar from this many scored pairs on
RewardFn = Callable[[list, list], Union[Sequence, torch.Tensor]]


def as_token_lists(seqs):
    """A list of lists of token ids (what a tokenizer returns) as a list of 1-D LongTensors; others unchanged."""
    if isinstance(seqs, (list, tuple)) and seqs and all(
        isinstance(s, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in s) for s in seqs
    ):
        return [torch.tensor(list(s), dtype=torch.long) for s in seqs]
    return seqs


def check_token_lists(prompts, responses, *, vocab_size: Optional[int] = None, same_length: bool = False) -> None:
    """``ValueError``/``TypeError`` naming the argument unless each list is a non-empty list of non-empty 1-D integer
    tensors with ids in [0, vocab_size) (``same_length``: and the two lists have one length)."""
    for name, seqs in (("prompts", prompts), ("responses", responses)):
        if isinstance(seqs, torch.Tensor) or not isinstance(seqs, Sequence):
            hint = ""
            if isinstance(seqs, torch.Tensor) and seqs.dim() == 2:
                hint = (" (a padded [N, T] tensor: pass the unpadded rows, [row[m.bool()] for row, m in "
                        "zip(input_ids, attention_mask)])")
            raise TypeError(f"{name} must be a list of 1-D LongTensors of token ids, got {type(seqs).__name__}{hint}")
        if len(seqs) == 0:
            raise ValueError(f"{name} must be a non-empty list, got an empty one")
        for k, s in enumerate(seqs):
            if not isinstance(s, torch.Tensor):
                hint = (" (text: train with VARTrainer(train_dataset=..., processing_class=tokenizer), which "
                        "tokenises TRL's dataset formats)") if isinstance(s, str) else ""
                raise TypeError(f"{name}[{k}] must be a 1-D torch.Tensor of token ids, got {type(s).__name__}{hint}")
            if s.dim() != 1:
                raise ValueError(f"{name}[{k}] must be 1-D (unpadded token ids), got shape {tuple(s.shape)}")
            if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
                raise TypeError(f"{name}[{k}] must hold integer token ids, got dtype {s.dtype}")
            if s.numel() == 0:
                what = (
                    "a prompt needs at least one token (e.g. BOS) to predict the first response token"
                    if name == "prompts"
                    else "an empty response has no tokens to score; drop the example or append EOS"
                )
                raise ValueError(f"{name}[{k}] is empty: {what}")
            if vocab_size is not None:
                lo, hi = int(s.min()), int(s.max())
                if lo < 0 or hi >= vocab_size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"{name}[{k}] has token id {bad} outside [0, vocab_size) = [0, {vocab_size})")
    if same_length and len(prompts) != len(responses):
        raise ValueError(
            f"prompts and responses must have the same length (one response per prompt), "
            f"got len(prompts)={len(prompts)} and len(responses)={len(responses)}"
        )


def _pad(seqs: Sequence[torch.Tensor], side: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D tensors to [N, max_len] on ``side`` with 0; returns (padded int64, mask bool)."""
    ids = pad_sequence([s.long() for s in seqs], batch_first=True, padding_side=side).to(device)
    mask = pad_sequence([torch.ones_like(s, dtype=torch.bool) for s in seqs], batch_first=True, padding_side=side)
    return ids, mask.to(device)


def _pair_logps_separately(model, head, pairs, prompts, responses, reduction, batch_size, bar, ignore_index=-100):
    """log π(y_j | x_i) for each (i, j) in ``pairs``: one forward of x_i ⊕ y_j per pair, batched."""
    device = _model_device(model)
    out = torch.empty(len(pairs), dtype=torch.float32)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [torch.cat([prompts[i].long(), responses[j].long()]) for i, j in chunk]
        ids, mask = _pad(seqs, "right", device)
        starts = torch.tensor([prompts[i].numel() for i, _ in chunk], device=device).unsqueeze(1)
        labels = torch.where(mask & (torch.arange(ids.shape[1], device=device) >= starts), ids, ignore_index)
        feats, _ = head.forward(model, input_ids=ids, attention_mask=mask.long(), use_cache=False)
        lp = head.logps(feats, labels, reduction=reduction, shift_labels=True)
        out[start : start + len(chunk)] = lp.float().cpu()
        bar.update(len(chunk))
    return out


def _pair_logps_shared(model, head, pairs, prompts, responses, reduction, batch_size, bar, ignore_index=-100):
    """log π(y_j | x_i) for each (i, j) in ``pairs`` (sorted by i), each prompt run once: left-padded prompt
    batches with a KV cache, then per continuation batch a deep copy of it, one cache row per pair
    (``batch_select_indices``) and position ids |x_i| + t (docs/trainer.md, "Prefix sharing")."""
    device = _model_device(model)
    out = torch.empty(len(pairs), dtype=torch.float32)
    prompt_ids = sorted({i for i, _ in pairs})
    for c in range(0, len(prompt_ids), batch_size):
        chunk_prompts = prompt_ids[c : c + batch_size]
        row_of = {i: r for r, i in enumerate(chunk_prompts)}
        x, x_mask = _pad([prompts[i] for i in chunk_prompts], "left", device)
        lens = x_mask.sum(1)
        x_pos = (x_mask.long().cumsum(1) - 1).clamp(min=0)
        feats, outputs = head.forward(
            model, input_ids=x, attention_mask=x_mask.long(), position_ids=x_pos, use_cache=True
        )
        cache = output_cache(outputs)
        if cache is None or not hasattr(cache, "batch_select_indices"):
            raise RuntimeError(
                f"{type(unwrap_model(model)).__name__} returned no transformers Cache with use_cache=True; "
                "use share_prefix=False for this model"
            )
        last = feats[:, -1:]  # [n, 1, H or V]: left padding puts every prompt's last token at the end
        chunk_pairs = [(k, i, j) for k, (i, j) in enumerate(pairs) if i in row_of]
        for start in range(0, len(chunk_pairs), batch_size):
            batch = chunk_pairs[start : start + batch_size]
            rows = torch.tensor([row_of[i] for _, i, _ in batch], device=device)
            ids, mask = _pad([responses[j] for _, _, j in batch], "right", device)
            L = ids.shape[1]
            past = copy.deepcopy(cache)
            past.batch_select_indices(rows)
            attn = torch.cat([x_mask[rows], mask], dim=1).long()
            pos = lens[rows].unsqueeze(1) + torch.arange(L, device=device)
            cont, _ = head.forward(
                model, input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=past, use_cache=True
            )
            # Position t of [last, cont[:, :-1]] predicts response token t: no shift needed.
            feats_r = torch.cat([last[rows], cont[:, :-1]], dim=1)
            labels = torch.where(mask, ids, torch.full_like(ids, ignore_index))
            lp = head.logps(feats_r, labels, reduction=reduction)
            out[torch.tensor([k for k, _, _ in batch])] = lp.float().cpu()
            bar.update(len(batch))
            del past, cont
    return out


def _bar(total: int, desc: str, progress: Optional[bool]) -> tqdm:
    """A tqdm bar over ``total`` pairs; ``progress=None`` shows it from ``PROGRESS_MIN_PAIRS`` pairs on."""
    return tqdm(total=total, desc=desc, leave=False,
                disable=not (progress or (progress is None and total >= PROGRESS_MIN_PAIRS)))


def _pairs(idx: Sequence[int], cross: bool) -> list[tuple[int, int]]:
    """The (prompt, response) index pairs of examples ``idx``: all B² (``cross``), or the B diagonal ones."""
    return [(i, j) for i in idx for j in idx] if cross else [(i, i) for i in idx]


@torch.no_grad()
def _logps(model, prompts, responses, cross, reduction, share_prefix, batch_size, progress) -> torch.Tensor:
    """``cross_pair_logps`` (``cross``) and ``paired_logps``: the checks, then the pairs' log-probs in eval mode."""
    check_option("reduction", reduction, REDUCTIONS)
    check_positive_int("batch_size", batch_size, allow_none=True)
    head = LMHead(model)
    check_token_lists(prompts, responses, vocab_size=head.vocab_size, same_length=True)
    B, bs = len(prompts), batch_size or (len(prompts) if cross else 8)
    score = _pair_logps_shared if cross and share_prefix else _pair_logps_separately
    was_training = model.training
    model.eval()
    try:
        with _bar(B * B if cross else B, "cross-pair log-probs" if cross else "log-probs", progress) as bar:
            q = score(model, head, _pairs(range(B), cross), prompts, responses, reduction, bs, bar)
    finally:
        model.train(was_training)
    return q.view(B, B) if cross else q


def cross_pair_logps(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    *,
    reduction: str = "mean",
    share_prefix: bool = True,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> torch.Tensor:
    """Reference log-probs of every response under every prompt: Q[i, j] = log π(y_j | x_i).

    Args:
        model: a causal LM (``transformers`` ``*ForCausalLM``, possibly PEFT/DDP-wrapped).
        prompts, responses: B unpadded, non-empty 1-D integer tensors each; response j belongs to prompt j.
        reduction: "mean" or "sum" over response tokens; must match the ``logp_reduction`` of the loss.
        share_prefix, batch_size, progress: one KV cache per prompt, sequences per forward (default B) and
            the tqdm bar: docs/trainer.md, "Cross-pair scoring".
    Returns:
        float32 [B, B] on CPU; row i = prompt i, column j = response j.
    """
    return _logps(model, prompts, responses, True, reduction, share_prefix, batch_size, progress)


def paired_logps(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    *,
    reduction: str = "mean",
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> torch.Tensor:
    """log π(y_i | x_i) for matched lists (the diagonal of Q; the (B,) shared-context form): float32 [N] on CPU.
    ``batch_size``: sequences per forward (default 8)."""
    return _logps(model, prompts, responses, False, reduction, False, batch_size, progress)


def _score_reward_pairs(reward, pairs, prompts, responses, batch_size, bar, pad_token_id) -> torch.Tensor:
    """r(x_i, y_j) for each (i, j) in ``pairs`` (indices into ``prompts`` / ``responses``), float32 on CPU."""
    out = torch.empty(len(pairs), dtype=torch.float32)
    describe, name = describe_pairs(pairs), reward_name(reward)
    if not isinstance(reward, torch.nn.Module):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            vals = reward([prompts[i] for i, _ in chunk], [responses[j] for _, j in chunk])
            scores = as_scores(vals, len(chunk), name=name, describe=lambda k, s=start: describe(s + k))
            if torch.isnan(scores).any():
                k = start + int(torch.isnan(scores).nonzero()[0])
                raise ValueError(
                    f"reward callable {name!r} returned None for {describe(k)}: a token-level reward must score "
                    "every pair (VARTrainer's text rewards take None as 'no reward' from one of several functions)"
                )
            out[start : start + len(chunk)] = scores
            bar.update(len(chunk))
    else:
        seqs = [torch.cat([prompts[i].long(), responses[j].long()]) for i, j in pairs]
        out = classifier_scores(reward, seqs, batch_size=batch_size, pad_token_id=pad_token_id, bar=bar)
    if not torch.isfinite(out).all():
        k = int((~torch.isfinite(out)).nonzero()[0])
        raise ValueError(f"reward {name!r} returned a non-finite score {out[k].item()} for {describe(k)}")
    return out


@torch.no_grad()
def _rewards(reward, prompts, responses, cross, batch_size, pad_token_id, progress) -> torch.Tensor:
    """``cross_pair_rewards`` (``cross``) and ``paired_rewards``: the checks (the token ids against a reward
    model's vocabulary), then the pairs' rewards."""
    is_model = isinstance(reward, torch.nn.Module)
    if not (is_model or callable(reward)):
        raise TypeError(
            "reward must be a transformers sequence-classification model (num_labels=1) or a callable "
            f"fn(prompts, responses) -> scores, got {type(reward).__name__}"
        )
    check_positive_int("batch_size", batch_size, allow_none=True)
    vocab = _vocab_size(unwrap_model(reward)) if is_model else None
    check_token_lists(prompts, responses, vocab_size=vocab, same_length=True)
    B, bs = len(prompts), batch_size or (len(prompts) if cross else 8)
    with _bar(B * B if cross else B, "cross-pair rewards" if cross else "rewards", progress) as bar:
        r = _score_reward_pairs(reward, _pairs(range(B), cross), prompts, responses, bs, bar, pad_token_id)
    return r.view(B, B) if cross else r


def cross_pair_rewards(
    reward: Union[torch.nn.Module, RewardFn],
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    *,
    batch_size: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    progress: Optional[bool] = None,
) -> torch.Tensor:
    """Rewards of every response under every prompt: R[i, j] = r(x_i, y_j).

    Args:
        reward: a sequence-classification model (``num_labels=1``) reading the token ids x_i ⊕ y_j, right-padded
            with ``pad_token_id`` (default its config's), or a callable ``fn(prompts, responses) -> scores`` on
            token ids scoring the pairs position by position: docs/trainer.md, "Cross-pair scoring".
        prompts, responses, progress: as for :func:`cross_pair_logps`.
        batch_size: pairs per reward call (default B, one row of the matrix).
    Returns:
        float32 [B, B] on CPU.
    """
    return _rewards(reward, prompts, responses, True, batch_size, pad_token_id, progress)


def paired_rewards(
    reward: Union[torch.nn.Module, RewardFn],
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    *,
    batch_size: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    progress: Optional[bool] = None,
) -> torch.Tensor:
    """r(x_i, y_i) for matched lists (the diagonal of R). Returns float32 [N] on CPU."""
    return _rewards(reward, prompts, responses, False, batch_size, pad_token_id, progress)
