"""R and Q of each fixed group ([G, B, B] or [G, B]), one tqdm bar over groups. Pairs stay the user's example
indices all the way down, so an error names the user's examples, not positions inside a group.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .lm_head import LMHead
from .pairs import PROGRESS_MIN_PAIRS, _pair_logps_separately, _pair_logps_shared, _score_reward_pairs


@torch.no_grad()
def score_groups(
    groups, prompts, responses, *, ref_model, reward, example_rewards, cross_pairs, reduction,
    share_prefix, batch_size, progress,
):
    """(R, Q) of shape [G, B, B] (``cross_pairs``) or [G, B], float32 on CPU, for ``groups``."""
    B = len(groups[0])
    per_group = B * B if cross_pairs else B
    show = progress or (progress is None and len(groups) * per_group >= PROGRESS_MIN_PAIRS)
    bar = tqdm(total=len(groups), desc="scoring VAR groups", unit="group", leave=False, disable=not show)
    head = LMHead(ref_model)
    was_training = ref_model.training
    ref_model.eval()
    no_bar = tqdm(disable=True)
    R, Q = [], []
    try:
        for idx in groups:
            if cross_pairs:
                pairs = [(i, j) for i in idx for j in idx]
                q = _pair_logps_shared if share_prefix else _pair_logps_separately
                Q.append(q(ref_model, head, pairs, prompts, responses, reduction, batch_size or B, no_bar).view(B, B))
            else:
                pairs = [(k, k) for k in idx]
                Q.append(_pair_logps_separately(ref_model, head, pairs, prompts, responses, reduction,
                                                batch_size or 8, no_bar))
            if example_rewards is not None:
                R.append(example_rewards[torch.tensor(idx)])
            elif callable(getattr(reward, "score_pairs", None)):  # a reward bound to the examples (text)
                R.append(reward.score_pairs(pairs).float().reshape(Q[-1].shape))
            else:
                bs = batch_size or (B if cross_pairs else 8)
                R.append(_score_reward_pairs(reward, pairs, prompts, responses, bs, no_bar, None).view(Q[-1].shape))
            bar.update(1)
    finally:
        bar.close()
        ref_model.train(was_training)
    return torch.stack(R).float(), torch.stack(Q).float()
