"""VAR training sets: fixed groups with their scores, one item per group, and ``VARDataset.build``, which
groups, looks up the cache, scores (split over the ranks) and caches: docs/trainer.md, "Datasets".
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from torch.nn.utils.rnn import pad_sequence

from .._validation import REDUCTIONS, check_option, check_pair_inputs, check_positive_int
from . import distributed as _dist
from . import scoring
from .cache import load_scores, save_scores, score_key
from .groups import VAR_COLUMNS, GroupShuffleSampler, VARCollator, check_group_size, make_groups
from .lm_head import LMHead, _vocab_size, unwrap_model
from .pairs import as_token_lists, check_token_lists

__all__ = ["VARDataset", "VARCollator", "GroupShuffleSampler", "make_groups"]

# How long rank 0 waits in VARDataset.build for the other ranks (gloo) before raising instead of hanging.
RENDEZVOUS_TIMEOUT_S = 600.0


class VARDataset(torch.utils.data.Dataset):
    """Fixed VAR groups with their reward and reference log-prob matrices; one item per group.

    Args:
        prompts, responses: N 1-D integer tensors each (unpadded, non-empty).
        groups: G lists of example indices (usually from :func:`make_groups`).
        rewards, ref_logps: [G, B, B] (R[g, i, j] = r(x_i, y_j) within group g) or [G, B] (shared context).
        pad_token_id, ignore_index: the pad of ``input_ids`` (masked out) and the label of prompt and padding.
        reduction: how ``ref_logps`` were reduced ("mean" / "sum"), if known; ``VARTrainer`` checks it.

    Item g: ``input_ids`` / ``attention_mask`` / ``labels`` [B, T_g] and ``rewards`` / ``ref_logps`` [B, B] or [B].
    Use :meth:`build` to score and cache.
    """

    def __init__(self, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                 groups: Sequence[Sequence[int]], rewards: torch.Tensor, ref_logps: torch.Tensor, *,
                 pad_token_id: int = 0, ignore_index: int = -100, reduction: Optional[str] = None):
        check_token_lists(prompts, responses, same_length=True)
        self.prompts, self.responses = list(prompts), list(responses)
        self.groups = [list(map(int, g)) for g in groups]
        if len(self.groups) == 0:
            raise ValueError("groups must hold at least one group, got none")
        sizes = {len(g) for g in self.groups}
        bad = [k for g in self.groups for k in g if not 0 <= k < len(self.prompts)]
        if bad:
            raise ValueError(f"groups holds example index {bad[0]} outside [0, {len(self.prompts)})")
        if len(sizes) != 1:
            raise ValueError(f"every group must have the same number B of examples, got group sizes {sorted(sizes)}")
        G, B = len(self.groups), next(iter(sizes))
        # Any real dtype is taken (stored as float32); the shape rules are the loss's, with the dataset's G and B.
        rewards, ref_logps = (t.float() if isinstance(t, torch.Tensor) else t for t in (rewards, ref_logps))
        try:
            check_pair_inputs(rewards, ref_logps, G * B, groups=G)
        except ValueError as e:
            raise ValueError(
                f"{e}. The dataset has G = {G} groups of B = {B} examples: rewards and ref_logps must have shape "
                f"[G, B, B] = {(G, B, B)} (cross-pair) or [G, B] = {(G, B)} (shared context)"
            ) from None
        self.rewards, self.ref_logps = rewards, ref_logps
        self.pad_token_id, self.ignore_index = int(pad_token_id), int(ignore_index)
        self.reduction = reduction

    @property
    def group_size(self) -> int:
        return len(self.groups[0])

    @property
    def cross_pairs(self) -> bool:
        return self.rewards.dim() == 3

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> dict:
        idx = self.groups[g]
        x, y = [self.prompts[k].long() for k in idx], [self.responses[k].long() for k in idx]
        ignore = [torch.full_like(p, self.ignore_index) for p in x]
        input_ids = pad_sequence([torch.cat(s) for s in zip(x, y)], batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence([torch.cat(s) for s in zip(ignore, y)], batch_first=True, padding_value=self.ignore_index)
        attention_mask = pad_sequence([torch.ones(len(p) + len(r), dtype=torch.long) for p, r in zip(x, y)],
                                      batch_first=True)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "rewards": self.rewards[g], "ref_logps": self.ref_logps[g]}

    def to_hf_dataset(self):
        """This dataset as a ``datasets.Dataset``, one row per group with the columns of :meth:`__getitem__` (torch
        format), for trainers that take only that (docs/trainer.md, "Drop-in recipe 3: TRL's SFTTrainer")."""
        import datasets

        rows = [self[g] for g in range(len(self))]
        columns = {name: [row[name].tolist() for row in rows] for name in VAR_COLUMNS}
        return datasets.Dataset.from_dict(columns).with_format("torch")

    @classmethod
    def build(
        cls, prompts: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], *, ref_model: torch.nn.Module,
        reward=None, example_rewards: Optional[Sequence[float]] = None, group_size: int = 8, seed: int = 0,
        cross_pairs: Optional[bool] = None, reduction: str = "mean", share_prefix: bool = True,
        batch_size: Optional[int] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
        model_fingerprint: Optional[str] = None, reward_fingerprint: Optional[str] = None, pad_token_id: int = 0,
        ignore_index: int = -100, progress: Optional[bool] = None, distributed: Optional[bool] = None,
    ) -> VARDataset:
        """Group, score and cache a VAR training set: docs/trainer.md, "Datasets", describes each step.

        Args:
            prompts, responses: N 1-D integer tensors (or lists of token ids) each; example k is
                (prompts[k], responses[k]). Text goes through ``VARTrainer``, which ends here.
            ref_model: the frozen reference causal LM (Q comes from it, no gradients).
            reward: a sequence-classification reward model or a callable ``fn(prompts, responses)`` on token
                ids (as for :func:`.pairs.cross_pair_rewards`), or an object with ``score_pairs(pairs of example
                indices)`` (:class:`.rewards.TextPairRewards`); or ``example_rewards``, N rewards r(x_k, y_k).
            group_size, seed: B >= 2 examples per group, seeded (:func:`make_groups`; N mod B examples dropped).
            cross_pairs: R and Q [G, B, B] (default) or [G, B] (shared context; the default with example_rewards).
            reduction: "mean" or "sum" for Q; must equal the trainer's ``logp_reduction``.
            share_prefix, batch_size, progress: as for :func:`.pairs.cross_pair_logps` (the bar counts groups).
            cache_dir: the score cache (None: none); ``model_fingerprint`` / ``reward_fingerprint`` stand in
                for the hashes of the reference's weights / the reward in its key.
            distributed: split the scoring over the ranks (None: when a process group is initialised): then
                every rank calls ``build`` at the same point, never inside ``main_process_first()``.
        """
        prompts, responses = as_token_lists(prompts), as_token_lists(responses)
        check_positive_int("batch_size", batch_size, allow_none=True)  # -1 would score nothing, silently
        cross_pairs, example_rewards = _check_build_inputs(
            prompts, responses, ref_model, reward, example_rewards, group_size, cross_pairs, reduction
        )
        groups = make_groups(len(prompts), group_size, seed=seed, drop_last=True)
        shape = (len(groups), group_size, group_size) if cross_pairs else (len(groups), group_size)
        rank, world = _dist.rank_world(distributed)
        _dist.enter(rank, world, RENDEZVOUS_TIMEOUT_S)
        make = functools.partial(cls, prompts, responses, groups, pad_token_id=pad_token_id,
                                 ignore_index=ignore_index, reduction=reduction)

        key = path = None
        if cache_dir is not None:
            options = {"group_size": group_size, "seed": seed, "cross_pairs": bool(cross_pairs), "reduction": reduction}
            key = score_key(prompts, responses, ref_model, reward if reward is not None else example_rewards, options,
                            model_fingerprint=model_fingerprint, reward_fingerprint=reward_fingerprint)
        if key is not None:
            path = Path(cache_dir) / f"var-scores-{key}.pt"
            cached = load_scores(path, key, groups, shape)
            # every rank takes the same branch (the scoring below is collective): the cache only if all read it
            if _dist.all_ranks(cached is not None, world):
                return make(*cached)

        mine = list(range(rank, len(groups), world))  # round-robin: groups cost about the same
        R_mine = Q_mine = torch.empty((0, *shape[1:]))
        if mine:
            R_mine, Q_mine = scoring.score_groups(
                [groups[g] for g in mine], prompts, responses, ref_model=ref_model, reward=reward,
                example_rewards=example_rewards, cross_pairs=cross_pairs, reduction=reduction,
                share_prefix=share_prefix, batch_size=batch_size, progress=progress if rank == 0 else False,
            )
        R, Q = _dist.gather_scores(len(groups), mine, R_mine, Q_mine, world)
        if path is not None:
            if int(os.environ.get("LOCAL_RANK", rank)) == 0:
                save_scores(path, key, groups, R, Q)
            if world > 1:
                torch.distributed.barrier()  # the file exists for every rank once build returns
        return make(R, Q)


def _check_build_inputs(prompts, responses, ref_model, reward, example_rewards, group_size, cross_pairs, reduction):
    """Checks of VARDataset.build, with the user's example indices; returns (cross_pairs, example_rewards)."""
    if reward is None and example_rewards is None:
        raise ValueError("pass reward (a model or callable) or example_rewards (one float per example)")
    if reward is not None and example_rewards is not None:
        raise ValueError("pass either reward or example_rewards, not both")
    if cross_pairs is None:
        cross_pairs = example_rewards is None
    if cross_pairs and example_rewards is not None:
        raise ValueError(
            "cross_pairs=True needs r(x_i, y_j) for every pair, but example_rewards gives only r(x_k, y_k); "
            "use cross_pairs=False (the (B,) shared-context form) or pass a reward model/callable"
        )
    check_group_size(group_size)
    check_option("reduction", reduction, REDUCTIONS)
    # token ids checked here, against the models' vocabularies, so that errors name the user's examples
    check_token_lists(prompts, responses, vocab_size=LMHead(ref_model).vocab_size, same_length=True)
    if isinstance(reward, torch.nn.Module):
        check_token_lists(prompts, responses, vocab_size=_vocab_size(unwrap_model(reward)))
    N = len(prompts)
    if example_rewards is not None:
        values = list(example_rewards) if not isinstance(example_rewards, torch.Tensor) else example_rewards
        for k, v in enumerate(values if not isinstance(values, torch.Tensor) else []):
            if v is None or isinstance(v, (str, bytes, bool)):
                raise TypeError(f"example_rewards[{k}] must be a finite float, got {v!r}")
        example_rewards = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
        if example_rewards.numel() != N:
            raise ValueError(
                f"example_rewards must have one reward per example (len(prompts) = {N}), got {example_rewards.numel()}"
            )
        bad = (~torch.isfinite(example_rewards)).nonzero()
        if bad.numel():
            k = int(bad[0])
            raise ValueError(f"example_rewards must be finite; got {example_rewards[k].item()} at example {k}")
    return cross_pairs, example_rewards
