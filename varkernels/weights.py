"""``var_weights``: the VAR weights of ``fused_var_loss``, public, for any weighted loss.

    var_weights(rewards, ref_logps, *, beta=1.0, weighting="posterior") -> [k·B] or [B] fp32, detached

The weights ``fused_var_loss`` computes from ``rewards`` / ``ref_logps`` (varkernels/var/weights.py),
validated like there, so that any trainer can feed VAR to ``weighted_nll``, ``linear_weighted_nll`` or a
model patched by ``patch_causal_lm`` (``loss_weights=``): ``weighted_nll(logits, labels, var_weights(R, Q))``
is ``fused_var_loss(logits, labels, R, Q)`` (same ``beta`` / ``weighting``; the NLL's ``reduction`` plays
the part of ``logp_reduction``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ._backend import resolve_backend
from ._validation import check_options, check_pair_inputs, check_positive_int, check_same_device, check_values
from .var.weights import var_weights as _group_weights


def var_weights(
    rewards: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 1.0,
    weighting: str = "posterior",
    groups: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """VAR weights w_i of k groups of B rows, as ``fused_var_loss`` computes them (docs/design.md §1).

    Args:
        rewards, ref_logps: the shapes of ``fused_var_loss``: cross-pair [B, B] or [k, B, B]
            (R[g, i, j] = r(x_gi, y_gj)), shared-context [B] or [k, B]; both the same shape. Each group
            is normalised inside itself.
        beta: temperature β > 0. weighting: "posterior" (w ∈ (0, B], default) or "importance".
        groups: k, only to read a square 2-D tensor as k = B shared-context groups [k, B]: without it a
            square 2-D tensor is one cross-pair group [B, B] (``fused_var_loss`` tells the two apart by its
            number of rows; here there are no rows). A leading group dimension is then required.
        backend: "auto" | "triton" | "cpu" | "torch" as in the losses ("cpu" computes them in PyTorch).
    Returns:
        [k·B] fp32 weights, detached (the ``weights`` field of ``fused_var_loss(..., return_aux=True)``);
        [B] for one group. Raises as ``fused_var_loss`` does on non-finite rewards, NaN / +inf ref_logps,
        a row whose ref_logps are all -inf, and importance weights that overflow.
    """
    check_options(weighting=weighting, beta=beta, backend=backend)
    check_positive_int("groups", groups, allow_none=True)
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2, 3):
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must have shape [B, B], [k, B, B], [B] or [k, B]; got {shape}")
    shape = tuple(rewards.shape)
    if groups is not None:
        rows = groups * shape[-1]
    elif len(shape) == 1 or (len(shape) == 2 and shape[0] == shape[1]):
        rows = shape[0]  # [B] or [B, B]: one group
    else:
        rows = shape[0] * shape[1]  # [k, B] or [k, B, B]
    k, B, cross = check_pair_inputs(rewards, ref_logps, rows, groups)
    check_same_device(rewards=rewards, ref_logps=ref_logps)
    resolved = resolve_backend(backend, rewards.device)
    no_labels = torch.zeros((0, 0), dtype=torch.long, device=rewards.device)
    check_values(no_labels, 1, -100, rewards, ref_logps)  # the data checks of the losses (eager only)
    w, _ = _group_weights(rewards, ref_logps, groups=k, group_size=B, cross_pairs=cross, beta=beta,
                          weighting=weighting, backend=resolved)
    return w
