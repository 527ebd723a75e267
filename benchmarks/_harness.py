"""Shared benchmark harness: timing percentiles, peak memory on CPU, machine facts, CSV rows.

Peak memory on CPU: PyTorch's CPU allocator keeps no statistics, but large tensors are
mmap-ed by glibc and returned on free, so the process's resident set tracks them. We reset
the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), run the
function, and read ``VmHWM`` from /proc/self/status: peak − resident-before is the extra
memory the function needed (its outputs and gradients included). On CUDA the same helpers use
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python benchmarks/x.py`` puts benchmarks/ on sys.path, not the repository root
    sys.path.insert(1, str(ROOT))

from tools.memory import fix_mmap_threshold, peak_rss_bytes  # noqa: E402, F401  (re-exported)

RESULTS = Path(__file__).resolve().parent / "results"


def arg_parser(doc: str, **shape) -> argparse.ArgumentParser:
    """A script's parser: its docstring as the help text, and an integer option per shape default
    (``arg_parser(__doc__, B=8, T=512)``: ``--B`` 8, ``--T`` 512)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in shape.items():
        p.add_argument(f"--{name}", type=int, default=default)
    return p


def release_cached_buffers() -> None:
    """Empty varkernels' CPU gradient-buffer cache (core/_grad_buffers.py), if varkernels is loaded."""
    import sys

    vk = sys.modules.get("varkernels")
    if vk is not None and hasattr(vk, "release_grad_buffers"):
        vk.release_grad_buffers()


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
    return peak_rss_bytes(fn)


def wall_time(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds of one call of ``fn``; on CUDA, synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], object], warmup: int = 1, reps: int = 5, device: str = "cpu") -> dict:
    """Median, 20th and 80th percentile of wall time (seconds) over ``reps`` calls."""
    for _ in range(warmup):
        fn()
    return summarize([wall_time(fn, device) for _ in range(reps)])


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


THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
PR_SET_THP_DISABLE, PR_GET_THP_DISABLE = 41, 42


def _bracketed(path: Path) -> str:
    """The selected word of a sysfs choice file ("always [madvise] never" -> "madvise"), "-" if unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return "-"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()


def thp_mode() -> str:
    """The machine's transparent-huge-pages mode ("always", "madvise", "never"; "-" if unreadable)."""
    return _bracketed(THP_DIR / "enabled")


def anon_huge_kib(path: str = "/proc/meminfo") -> int | str:
    """AnonHugePages (KiB) of the machine (/proc/meminfo) or of this process (/proc/self/smaps_rollup)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return "-"


def _prctl(option: int, arg: int = 0) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, arg, 0, 0, 0)


def disable_thp_for_process() -> bool:
    """``prctl(PR_SET_THP_DISABLE, 1)``: no transparent huge pages for this process (and its children),
    whatever the machine's mode; the machine's settings are not touched. True if it took effect."""
    try:
        return _prctl(PR_SET_THP_DISABLE, 1) == 0 and _prctl(PR_GET_THP_DISABLE) == 1
    except (OSError, AttributeError):
        return False


def thp_disabled_for_process() -> int | str:
    try:
        return _prctl(PR_GET_THP_DISABLE)
    except (OSError, AttributeError):
        return "-"


_ANON_HUGE_BEFORE = anon_huge_kib()  # at import: the start of the benchmark's process


def memory_state() -> dict:
    """The machine's memory state that moves CPU timings of large fresh buffers (the kernel's THP mode and
    defrag mode, whether THP is disabled for this process) and AnonHugePages of the machine when the
    harness was imported (the run's start) and now, and of this process now. Added to every CSV row."""
    return {"thp_enabled": thp_mode(), "thp_defrag": _bracketed(THP_DIR / "defrag"),
            "thp_disabled_process": thp_disabled_for_process(),
            "anon_huge_kib_before": _ANON_HUGE_BEFORE, "anon_huge_kib_after": anon_huge_kib(),
            "anon_huge_kib_process": anon_huge_kib("/proc/self/smaps_rollup")}


def append_csv(path: Path, rows: list, fields=None) -> None:
    """Append ``rows`` (dicts) to the CSV at ``path``, writing its header if the file is new.

    Every row gets the columns of ``memory_state()`` (THP modes, AnonHugePages before and after) and,
    unless it has a load column already, ``load_avg_1min``: one place for every benchmark script.

    When the rows carry columns the file does not have yet (or lack some it has), the file is
    rewritten once with the union of the columns, old columns first: earlier rows keep their
    values and get empty cells for the new columns, so no row is ever misaligned with the header.

    ``fields``: a fixed schema instead (the GPU suite's): each row is written with exactly those columns (missing
    ones empty, others dropped), no state columns are added, and the file is synced to disk, so that a row
    survives the machine being taken back mid-run."""
    if fields is not None:
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerows({k: r.get(k, "") for k in fields} for r in rows)
            f.flush()
            os.fsync(f.fileno())
        return
    if not rows:
        return
    state, load = memory_state(), load_average()
    rows = [{**r, **{k: v for k, v in state.items() if k not in r},
             **({} if "load_avg_1min" in r or "load_1min" in r else {"load_avg_1min": load})} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    old_rows = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = list(reader.fieldnames or [])
            if old_fields != fields:
                old_rows = list(reader)
        if old_fields == fields:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerows(rows)
            return
        fields = list(dict.fromkeys([*old_fields, *fields]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(old_rows)
        w.writerows(rows)


def read_rows(path: Path) -> list:
    """The rows of a CSV as dicts ([] when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def machine_line() -> str:
    m = machine_info()
    return (f"machine: {m['cpu']} | {m['threads']} threads | torch {m['torch']} | triton {m['triton']} "
            f"| gpu {m['gpu']} | {m['date']}")


def start_run() -> None:
    """A script's first step: glibc's mmap threshold fixed (``fix_mmap_threshold``: the peak resident set counts
    live tensors) and the machine line printed."""
    fix_mmap_threshold()
    print(machine_line())


def measure(fn: Callable[[], object], device: str = "cpu", reps: int = 3,
            setup: Callable[[], object] = lambda: None) -> dict:
    """Time and peak memory of ``fn``: ``time_fn``'s percentiles, ``peak_extra_bytes`` and
    ``first_call_s`` (the wall time of the first, warm-up call: compilation included).

    ``setup`` runs before every call, untimed and before the resident memory is read (reset the
    gradients there, so that the previous call's gradient is not counted as resident and the new
    one is counted in the peak). On CPU: one warm-up call, then ``reps`` timed calls, the first of
    which also gives ``peak_extra_bytes`` (``peak_memory_bytes``; see ``fix_mmap_threshold``). On
    CUDA: the peak from one call, the time from ``triton.testing.do_bench`` (its own warm-up, L2
    flush between calls, median / 20th / 80th percentiles over as many calls as fit in a second)."""
    times = []

    def timed():
        times.append(wall_time(fn, device))

    setup()
    timed()  # warm-up: JIT builds, torch.compile, allocator
    first = times.pop()
    setup()
    mem = peak_memory_bytes(timed, device)
    if device == "cuda":
        import triton.testing

        def call():
            setup()
            fn()

        med, p20, p80 = triton.testing.do_bench(call, rep=1000, quantiles=[0.5, 0.2, 0.8])
        t = {"median_s": med / 1e3, "p20_s": p20 / 1e3, "p80_s": p80 / 1e3, "reps": "do_bench(rep=1000ms)"}
    else:
        for _ in range(reps - 1):
            setup()
            timed()
        t = summarize(times)
    return {**t, "peak_extra_bytes": mem, "first_call_s": first}


def measure_interleaved(calls: dict, device: str = "cpu", reps: int = 3, fresh_buffers: bool = False) -> dict:
    """``measure`` for several functions of one config, with the timed calls interleaved.

    ``calls`` maps a name to ``(fn, setup)``. Each function gets its warm-up call and its peak-memory
    call in turn; then the ``reps`` timed calls go round-robin (round 1 of every function, then
    round 2, ...), so that a change of load on a shared machine during the config hits every
    function alike and their ratios stay comparable. On CUDA each function is ``measure``-d in turn
    (``do_bench`` is not disturbed by other users of the host). Returns name → ``measure``'s dict,
    or name → the exception its warm-up or a timed call raised.

    ``fresh_buffers``: empty varkernels' gradient-buffer cache before each peak-memory call, so that the
    peak counts the gradient buffer the call hands back (else it is resident before the call and only
    the scripts that report the cache's "held" bytes beside the peak, like bench_var_loss.py, count it);
    that call is then not timed (it pays the fresh buffer's page faults) and ``reps`` calls follow."""
    if device == "cuda":
        out = {}
        for name, (fn, setup) in calls.items():
            try:
                out[name] = measure(fn, device, reps, setup)
            except Exception as e:  # noqa: BLE001 - reported per function by the caller
                out[name] = e
        return out
    out, times = {}, {name: [] for name in calls}
    for name, (fn, setup) in calls.items():
        try:
            setup()
            first = wall_time(fn, device)
            setup()
            box = []
            if fresh_buffers:
                release_cached_buffers()
            mem = peak_memory_bytes(lambda: box.append(wall_time(fn, device)), device)
            times[name] += [] if fresh_buffers else box
            out[name] = {"peak_extra_bytes": mem, "first_call_s": first}
        except Exception as e:  # noqa: BLE001
            out[name] = e
        finally:
            setup()
    for _ in range(reps if fresh_buffers else reps - 1):
        for name, (fn, setup) in calls.items():
            if isinstance(out[name], Exception):
                continue
            try:
                setup()
                times[name].append(wall_time(fn, device))
            except Exception as e:  # noqa: BLE001
                out[name] = e
            finally:
                setup()
    for name, result in out.items():
        if not isinstance(result, Exception):
            result.update(summarize(times[name]))
    return out



def floor_sweeps(logits: torch.Tensor) -> dict:
    """This machine's floor for a loss over ``logits``, as ``measure_interleaved`` calls.

    A fused logits-input loss must at least find each row's maximum (one read), exponentiate
    (one read, one write) and scale into the gradient (one read, one write): the sum of the medians
    of ``x.amax(-1)``, ``torch.exp(x, out=buf)`` and ``buf.mul_(s)``, with ``buf`` faulted in once
    beforehand (the floor is the sweeps, not the allocator). Keys: ``sweep_max``, ``sweep_exp``,
    ``sweep_scale``; add their ``median_s`` to get the floor."""
    x = logits.detach()
    buf = torch.empty_like(x)
    buf.fill_(1.0)
    nothing = lambda: None  # noqa: E731
    return {
        "sweep_max": (lambda: x.amax(dim=-1), nothing),          # one read
        "sweep_exp": (lambda: torch.exp(x, out=buf), nothing),   # one read, one write, exp
        "sweep_scale": (lambda: buf.mul_(1.0000001), nothing),   # one read, one write
    }


FLOOR_SWEEPS = ("sweep_max", "sweep_exp", "sweep_scale")


def run_id() -> str:
    """A run's id: its start time, ``YYYYmmddTHHMMSS`` (the ``run`` column of the CSVs)."""
    return datetime.datetime.now().strftime("%Y%m%dT%H%M%S")


def git_revision() -> str:
    """The commit the numbers belong to ("-dirty" when the working tree has changes)."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"


def grad_resets(logits: torch.Tensor):
    """(work, clear, refill) for timing losses on ``logits`` [B, T, V] between untimed resets:
    ``clear`` drops logits.grad; ``work`` is a copy that an ``inplace=True`` provider may overwrite,
    and ``refill`` restores it from ``logits`` (and drops its grad)."""
    work = logits.detach().clone().requires_grad_(True)

    def clear():
        logits.grad = None

    def refill():
        with torch.no_grad():
            work.copy_(logits)
        work.grad = None

    return work, clear, refill


def load_average() -> float:
    """The 1-minute load average (nan where the OS has none): how busy the shared machine was."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")
