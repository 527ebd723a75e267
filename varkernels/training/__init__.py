"""Training side of varkernels (needs the ``train`` extra: ``pip install "varkernels[train]"``).

    pairs.py        cross-pair scoring: R[i, j] = r(x_i, y_j), Q[i, j] = log π_ref(y_j | x_i)
    rewards.py      TRL's reward contract on text: functions, reward models, weights (offline and online)
    groups.py       fixed groups of B, GroupShuffleSampler, VARCollator (stacks k whole groups)
    scoring.py      R and Q of each group (user example indices in every error)
    cache.py        the score files: datasets' Hasher key, checksum, atomic save
    distributed.py  which rank scores which groups; gathering (torch.distributed collectives)
    data.py         VARDataset and VARDataset.build (the orchestration of the above)
    lm_head.py      the causal LM's output head for the fused-linear ops
    trainer.py      VARConfig / VARTrainer (a transformers.Trainer) and compute_var_loss
    online.py       OnlineVARConfig / OnlineVARTrainer (on TRL's GRPOTrainer): online VAR
    cli.py          the varkernels-train command (trl.TrlParser)
"""

import importlib

from .data import GroupShuffleSampler, VARCollator, VARDataset, make_groups
from .lm_head import LMHead, unwrap_model
from .pairs import cross_pair_logps, cross_pair_rewards, paired_logps, paired_rewards

# trainer.py imports transformers and online.py trl: imported on first use, the scoring and data modules need neither.
_LAZY = {**dict.fromkeys(("VARConfig", "VARTrainer", "compute_var_loss", "split_groups"), "trainer"),
         **dict.fromkeys(("OnlineVARConfig", "OnlineVARTrainer"), "online")}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'varkernels.training' has no attribute {name!r}")


__all__ = [
    "GroupShuffleSampler", "VARCollator", "VARDataset", "make_groups", "LMHead", "unwrap_model",
    "cross_pair_logps", "cross_pair_rewards", "paired_logps", "paired_rewards", *_LAZY,
]
