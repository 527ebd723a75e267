"""R and Q of each fixed group ([G, B, B] or [G, B]), one tqdm bar over groups. Pairs stay the user's example
indices all the way down, so an error names the user's examples, not positions inside a group.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .lm_head import LMHead
from .pairs import PROGRESS_MIN_PAIRS, _pair_logps_separately, _pair_logps_shared, _pairs, _score_reward_pairs


@torch.no_grad()
def score_groups(
    groups, prompts, responses, *, ref_model, reward, example_rewards, cross_pairs, reduction,
    share_prefix, batch_size, progress,
):
    """(R, Q) of shape [G, B, B] (``cross_pairs``) or [G, B], float32 on CPU, for ``groups``."""
    B = len(groups[0])
    shape, bs = ((B, B) if cross_pairs else (B,)), batch_size or (B if cross_pairs else 8)
    show = progress or (progress is None and len(groups) * (B * B if cross_pairs else B) >= PROGRESS_MIN_PAIRS)
    bar = tqdm(total=len(groups), desc="scoring VAR groups", unit="group", leave=False, disable=not show)
    head, no_bar = LMHead(ref_model), tqdm(disable=True)
    score = _pair_logps_shared if cross_pairs and share_prefix else _pair_logps_separately
    was_training = ref_model.training
    ref_model.eval()
    R, Q = [], []
    try:
        for idx in groups:
            pairs = _pairs(idx, cross_pairs)
            Q.append(score(ref_model, head, pairs, prompts, responses, reduction, bs, no_bar).view(shape))
            if example_rewards is not None:
                R.append(example_rewards[torch.tensor(idx)])
            elif callable(getattr(reward, "score_pairs", None)):  # a reward bound to the examples (text)
                R.append(reward.score_pairs(pairs).float().reshape(shape))
            else:
                R.append(_score_reward_pairs(reward, pairs, prompts, responses, bs, no_bar, None).view(shape))
            bar.update(1)
    finally:
        bar.close()
        ref_model.train(was_training)
    return torch.stack(R).float(), torch.stack(Q).float()
