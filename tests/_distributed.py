"""Spawning the two-process (gloo, CPU) tests: test_distributed.py, test_online.py, test_patch.py."""

import os
import socket
import time

import pytest
import torch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, *args, nprocs=2, deadline_s=240):
    """Start ``worker(rank, nprocs, port, *args)`` in ``nprocs`` processes; fail (never hang) after the deadline."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(nprocs, _free_port(), *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + deadline_s
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{worker.__name__} did not finish within {deadline_s} s")


def _init(rank, world_size, port):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return dist


def _leave(dist):
    dist.barrier()
    # As in the DDP test: skip interpreter teardown, where destroying the gloo group can deadlock.
    os._exit(0)
