"""Which rank scores which groups (rank r: groups r, r + N, …) and the all-gather of the scores; on gloo a
``monitored_barrier`` turns a build inside ``main_process_first()`` into an error instead of a hang.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def rank_world(distributed: Optional[bool]) -> tuple[int, int]:
    """(rank, world size) to split the scoring over; (0, 1) when not distributed."""
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group, found none")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def enter(rank: int, world: int, timeout_s: float) -> None:
    """Every rank meets here (a collective); on gloo rank 0 raises if one has not come within ``timeout_s``."""
    if world == 1 or dist.get_backend() != "gloo":  # monitored_barrier is gloo's only
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"VARDataset.build on rank {rank}: not every rank entered it within {timeout_s:.0f} s ({exc}). Under "
            "torch.distributed the scoring is split over the ranks, so every rank must call build at the same "
            "point; do not run it inside main_process_first() (the other ranks wait in a barrier there), or pass "
            "distributed=False to score on each rank alone"
        ) from exc


def all_ranks(flag: bool, world: int) -> bool:
    """True on every rank when ``flag`` is True on every rank (a collective call when world > 1)."""
    flags = [flag] * world
    if world > 1:
        dist.all_gather_object(flags, bool(flag))
    return all(flags)


def gather_scores(num_groups: int, mine: list[int], R_mine: torch.Tensor, Q_mine: torch.Tensor, world: int):
    """All ranks' (R, Q) shares put back in group order: [G, ...] each, identical on every rank."""
    if world == 1:
        return R_mine, Q_mine
    shares = [None] * world
    dist.all_gather_object(shares, (mine, R_mine, Q_mine))
    R = torch.empty((num_groups, *R_mine.shape[1:]), dtype=torch.float32)
    Q = torch.empty_like(R)
    for idx, r_part, q_part in shares:
        R[idx], Q[idx] = r_part, q_part
    return R, Q
