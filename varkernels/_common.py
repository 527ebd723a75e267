"""Shared types, option names and input validation for every varkernels op.

Validation follows docs/design.md §2: each bad input raises ``ValueError`` / ``TypeError`` that names the
argument, what was expected and what was given, and nothing of the caller's is modified before
the error is raised (all checks run before any kernel touches memory).

Data-dependent checks (labels in range, NaN/+inf in rewards and ref_logps) need one host
synchronisation. They are gathered into a single ``.tolist()`` so a loss call costs one sync,
on tensors that are tiny next to the logits (labels: B·T ints; rewards/ref_logps: B² floats).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

WEIGHTINGS = ("posterior", "importance")
REDUCTIONS = ("mean", "sum")
LOGP_REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpu", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class VAROutput(NamedTuple):
    """Result of a VAR loss call with ``return_aux=True``.

    Attributes:
        loss: [] float32 scalar, ``-(1/B) * sum_i w_i * s_i``; differentiable w.r.t. the policy.
        weights: [B] float32, the stop-gradient weights ``w_i``.
        log_z: [B] float32, ``log Ẑ_i = logsumexp_j A[i, j] - log B``.
        policy_logps: [B] float32, the sequence log-probs ``s_i`` (detached).
        ess: [] float32, effective sample size ``(Σw)² / Σw²`` of the weights, in [1, B].
    """

    loss: torch.Tensor
    weights: torch.Tensor
    log_z: torch.Tensor
    policy_logps: torch.Tensor
    ess: torch.Tensor


def check_option(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number > 0, got {type(value).__name__} {value!r}")
    if not (value > 0) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_tensor(name: str, t, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(
                f"{k} must be on the same device as {k0} ({v0.device}), got {v.device}"
            )


def check_policy_inputs(
    logits_name: str, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> None:
    """Static checks of logits/hidden ([B, T, *]) against labels ([B, T])."""
    _check_tensor(logits_name, logits, FLOAT_DTYPES)
    _check_tensor("labels", labels, (torch.int64, torch.int32))
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must have shape [B, T, *] (3 dims), got {tuple(logits.shape)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, T], got {tuple(labels.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels must have shape [B, T] = {tuple(logits.shape[:2])} to match {logits_name}, "
            f"got {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0 or logits.shape[1] == 0 or vocab_size == 0:
        raise ValueError(f"{logits_name} must be non-empty, got shape {tuple(logits.shape)}")


def check_pair_inputs(rewards: torch.Tensor, ref_logps: torch.Tensor, batch: int) -> bool:
    """Static checks of rewards/ref_logps; returns True for the (B, B) cross-pair form."""
    _check_tensor("rewards", rewards, (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    _check_tensor("ref_logps", ref_logps, (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    shapes = {(batch, batch): True, (batch,): False}
    for name, t in (("rewards", rewards), ("ref_logps", ref_logps)):
        if tuple(t.shape) not in shapes:
            raise ValueError(
                f"{name} must have shape (B, B) = {(batch, batch)} or (B,) = {(batch,)}, "
                f"got {tuple(t.shape)}"
            )
    if rewards.dim() != ref_logps.dim():
        raise ValueError(
            "rewards and ref_logps must both be (B, B) or both be (B,); got rewards "
            f"{tuple(rewards.shape)} and ref_logps {tuple(ref_logps.shape)}"
        )
    return rewards.dim() == 2


def check_values(
    labels: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    rewards: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
) -> None:
    """Data-dependent checks, one host sync for all of them."""
    bad_label = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    flags = [bad_label.any()]
    if rewards is not None:
        flags += [torch.isnan(rewards).any(), torch.isinf(rewards).any()]
        flags += [torch.isnan(ref_logps).any(), (ref_logps == math.inf).any()]
        # A row whose every pair is impossible (all ref_logps = -inf) has Ẑ_i = 0: w_i undefined.
        flags += [torch.isneginf(ref_logps).all(dim=-1).any()]
    values = torch.stack(flags).tolist()
    if values[0]:
        idx = bad_label.nonzero()[0].tolist()
        raise ValueError(
            f"labels must be in [0, V) = [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"got {labels[tuple(idx)].item()} at index {tuple(idx)}"
        )
    if rewards is None:
        return
    if values[1] or values[2]:
        raise ValueError("rewards must be finite; got NaN or ±inf")
    if values[3] or values[4]:
        raise ValueError("ref_logps must not be NaN or +inf (-inf is allowed: an impossible response)")
    if values[5]:
        raise ValueError(
            "ref_logps has a row whose every entry is -inf: no response is possible under that "
            "prompt, so its partition function is 0 and its weight is undefined"
        )


def shifted_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Hugging Face causal shift: position t predicts labels[:, t+1]; the last predicts nothing.

    Only the [B, T] labels are copied; logits / hidden states are never moved.
    """
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out
