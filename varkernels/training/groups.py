"""Fixed VAR groups and how they reach the loss: ``make_groups``, ``VARCollator``, ``GroupShuffleSampler``. A group
is a unit of the data (its weights are normalised inside it): docs/design.md §5, docs/trainer.md "Datasets".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from .._validation import check_positive_int

VAR_COLUMNS = ("input_ids", "attention_mask", "labels", "rewards", "ref_logps")


def check_group_size(group_size) -> None:
    """A VAR group needs B >= 2 examples: with B = 1 every weight is exactly 1 (plain SFT)."""
    try:
        check_positive_int("group_size", group_size)
    except ValueError as e:
        raise ValueError(f"{e}; a VAR group needs B >= 2 examples") from None
    if group_size < 2:
        raise ValueError(
            f"group_size must be an int >= 2, got {group_size}: the VAR weights are normalised inside a group, "
            "so a group of one example has weight 1 whatever its reward (plain SFT); use B >= 2"
        )


def make_groups(num_examples: int, group_size: int, *, seed: int = 0, drop_last: bool = True) -> list[list[int]]:
    """Example indices 0..N-1 in fixed groups of ``group_size``: a permutation seeded by ``seed``, so the same
    arguments give the same groups. ``drop_last``: the N mod B left over are dropped (every micro-batch has one B,
    as gradient accumulation and DDP need: docs/trainer.md, "Datasets"); otherwise the last group is smaller."""
    check_positive_int("group_size", group_size)
    if not isinstance(num_examples, int) or num_examples < group_size:
        raise ValueError(
            f"num_examples must be an int >= group_size = {group_size} (at least one full group), got {num_examples!r}"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_examples, generator=gen).tolist()
    n = (num_examples // group_size) * group_size if drop_last else num_examples
    return [perm[k : k + group_size] for k in range(0, n, group_size)]


class VARCollator:
    """Stacks k whole groups into one batch: [k·B, T] sequences (padded with ``pad_token_id`` / ``ignore_index``),
    [k, B, B] or [k, B] scores. Groups are never mixed: the loss normalises each separately."""

    def __init__(self, pad_token_id: int = 0, ignore_index: int = -100):
        self.pad_token_id, self.ignore_index = pad_token_id, ignore_index

    def __call__(self, features: Sequence[dict]) -> dict:
        if len(features) == 0:
            raise ValueError("VARCollator got an empty list of features (expected k >= 1 groups)")
        missing = [c for c in VAR_COLUMNS if c not in features[0]]
        if missing:
            raise ValueError(
                f"VARCollator: the features have no {missing} column(s) (they have {sorted(features[0])}). "
                "Each feature must be one VARDataset group with the columns "
                f"{list(VAR_COLUMNS)}; a Trainer with remove_unused_columns=True (the default of "
                "TrainingArguments, and of TRL's SFTConfig) drops every column its model's forward (or "
                "its signature columns) does not name: set remove_unused_columns=False"
            )
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": self.ignore_index}
        batch = {c: pad_sequence([r for f in features for r in torch.as_tensor(f[c], dtype=torch.long)],
                                 batch_first=True, padding_value=value) for c, value in pads.items()}
        for c in ("rewards", "ref_logps"):
            batch[c] = torch.stack([torch.as_tensor(f[c], dtype=torch.float32) for f in features])
        return batch


class GroupShuffleSampler(torch.utils.data.Sampler):
    """Group order for a plain PyTorch loop: a seeded permutation of whole groups per epoch, depending only on
    (seed, epoch); call ``set_epoch(e)`` at the start of each epoch (as with ``DistributedSampler``)."""

    def __init__(self, num_groups: int, seed: int = 0):
        self.num_groups, self.seed, self.epoch = num_groups, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_groups, generator=gen).tolist())

    def __len__(self) -> int:
        return self.num_groups
