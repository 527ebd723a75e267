"""Shared benchmark harness: timing percentiles, peak memory on CPU, machine facts, CSV rows.

Peak memory on CPU: PyTorch's CPU allocator keeps no statistics, but large tensors are
mmap-ed by glibc and returned on free, so the process's resident set tracks them. We reset
the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), run the
function, and read ``VmHWM`` from /proc/self/status: peak − resident-before is the extra
memory the function needed (its outputs and gradients included). On CUDA the same helpers use
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Extra peak memory (bytes) of one call of ``fn`` beyond what is resident before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def time_fn(fn: Callable[[], object], warmup: int = 1, reps: int = 5, device: str = "cpu") -> dict:
    """Median, 20th and 80th percentile of wall time (seconds) over ``reps`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def summarize(times: list) -> dict:
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_s": statistics.median(times), "p20_s": q[0], "p80_s": q[3], "reps": len(times)}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
    }


def append_csv(path: Path, rows: list) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    fields = list(rows[0].keys())
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def machine_line() -> str:
    m = machine_info()
    return (f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | triton {m['triton']} "
            f"| gpu {m['gpu']} | {m['date']}")
