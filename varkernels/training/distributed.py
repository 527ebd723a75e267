"""Distributed coordination of the scoring: who scores which groups, meeting points, gathering.

Under ``torch.distributed`` with N ranks, rank r scores groups r, r + N, r + 2N, … and the scores
are all-gathered, so every rank holds the whole dataset. Every rank must therefore enter the
build at the same point; :func:`rendezvous` turns the usual mistake (a build inside
``main_process_first()``, where the other ranks wait in a barrier) into an error.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

_BUILD_CALLS = [0]  # distributed builds so far in this process: the same count on every rank


def rank_world(distributed: Optional[bool]) -> tuple[int, int]:
    """(rank, world size) to split the scoring over; (0, 1) when not distributed."""
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ValueError("distributed=True needs an initialised torch.distributed process group, found none")
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def rendezvous(rank: int, world: int, timeout_s: float) -> None:
    """Wait until every rank has entered this build, through the process group's store, or raise."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no store to meet at (a custom backend): go on without the check
        return
    _BUILD_CALLS[0] += 1
    key = f"varkernels/VARDataset.build/{_BUILD_CALLS[0]}"
    arrived = store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while arrived < world:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"VARDataset.build on rank {rank}: only {arrived} of {world} ranks entered it within "
                f"{timeout_s:.0f} s. Under torch.distributed the scoring is split over the ranks, so "
                "every rank must call build at the same point; do not run it inside main_process_first() (the "
                "other ranks wait in a barrier there), or pass distributed=False to score on each rank alone"
            )
        time.sleep(0.05)
        arrived = store.add(key, 0)


def local_rank(rank: int) -> int:
    local = os.environ.get("LOCAL_RANK")
    return int(local) if local is not None and local.isdigit() else rank


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on every rank (a collective call)."""
    import torch.distributed as dist

    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


def my_share(num_groups: int, rank: int, world: int) -> list[int]:
    """The groups this rank scores: round-robin (groups cost about the same)."""
    return list(range(rank, num_groups, world))


def gather_scores(num_groups: int, mine: list[int], R_mine: torch.Tensor, Q_mine: torch.Tensor, world: int):
    """All ranks' (R, Q) shares put back in group order: [G, ...] each, identical on every rank."""
    if world == 1:
        return R_mine, Q_mine
    import torch.distributed as dist

    shares = [None] * world
    dist.all_gather_object(shares, (mine, R_mine, Q_mine))
    R = torch.empty((num_groups, *R_mine.shape[1:]), dtype=torch.float32)
    Q = torch.empty_like(R)
    for idx, r_part, q_part in shares:
        if idx:
            R[torch.tensor(idx)] = r_part
            Q[torch.tensor(idx)] = q_part
    return R, Q


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
