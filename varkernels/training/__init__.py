"""Training side of varkernels (needs the ``train`` extra: ``pip install "varkernels[train]"``).

The modules and what each does: the table at the top of docs/trainer.md; online VAR: docs/online.md.
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
