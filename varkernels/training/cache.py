"""The score cache: ``var-scores-<key>.pt`` per build, keyed by ``datasets.fingerprint.Hasher``, with a checksum
and an atomic write (docs/trainer.md, "Datasets", item 3).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from .lm_head import unwrap_model

CACHE_FORMAT = 4  # 4: datasets' Hasher
_WARNED = []  # the one "not cached" warning of this process, once given


def score_key(prompts, responses, ref_model, reward, options: dict, *, model_fingerprint=None,
              reward_fingerprint=None) -> Optional[str]:
    """The cache key of a build, or None (warned once) when ``reward`` cannot be hashed."""
    from datasets.fingerprint import Hasher
    from trl.trainer.utils import hash_module

    try:
        reward_id = reward_fingerprint or Hasher.hash(reward)
    except Exception as exc:  # noqa: BLE001 - dill raises many kinds: any means "no stable identity"
        if not _WARNED:
            _WARNED.append(True)
            warnings.warn(f"VARDataset.build: the scores are not cached: datasets' Hasher cannot hash the reward "
                          f"({type(exc).__name__}: {exc}). Pass reward_fingerprint='...' (a name that changes when "
                          "the reward does) to cache them. This warning is shown once", stacklevel=3)
        return None
    model_id = model_fingerprint or hash_module(unwrap_model(ref_model))
    return Hasher.hash([CACHE_FORMAT, options, prompts, responses, model_id, reward_id])


def load_scores(path: Path, key: str, groups: list, shape: tuple):
    """(R, Q) from a cache file, or None when it is absent, stale, truncated or corrupted (warned)."""
    from datasets.fingerprint import Hasher

    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        R, Q = blob["rewards"], blob["ref_logps"]
        ok = blob["key"] == key and blob["groups"] == groups and tuple(R.shape) == tuple(Q.shape) == shape
        problem = None if ok and blob["digest"] == Hasher.hash([R, Q]) else "its key, groups, shape or checksum differ"
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a bad pickle, missing entries: all mean "score again"
        problem = f"it does not load ({type(exc).__name__}: {exc})"
    if problem is not None:
        warnings.warn(f"VAR score cache {path} is not usable: {problem}; scoring again", stacklevel=3)
        return None
    return R.float(), Q.float()


def save_scores(path: Path, key: str, groups: list, R: torch.Tensor, Q: torch.Tensor) -> None:
    """Write the scores atomically: a temporary file in the same folder, then ``os.replace``."""
    from datasets.fingerprint import Hasher

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"key": key, "groups": groups, "rewards": R, "ref_logps": Q, "digest": Hasher.hash([R, Q])}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
