"""Spawning the two-process (gloo, CPU) tests: tests/test_distributed.py and tests/test_online.py."""

import socket
import time

import pytest


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
