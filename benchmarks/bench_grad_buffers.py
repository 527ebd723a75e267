"""Where a fresh gradient buffer's time goes on CPU, and the alternatives to paying it on every call.

    python benchmarks/bench_grad_buffers.py                  # 500 MiB (B=8 T=512 V=32000 fp32), 11 rounds
    python benchmarks/bench_grad_buffers.py --thp-disable    # the same with prctl(PR_SET_THP_DISABLE, 1)

Each strategy gets a [B, T, V] buffer and writes it once (``torch.exp(x, out=buf)``: one parallel sweep,
as the loss kernel writes its gradient); the time is allocation + that write:

    touched        the same buffer every call (faulted in once beforehand): the write alone, the floor
    fresh          torch.empty each call: every 4 KiB page faults on its first write
    fresh_madvise  torch.empty + madvise(MADV_HUGEPAGE): what the C++ kernel did before; with THP in
                   "madvise" mode huge pages, and with defrag "madvise" synchronous compaction
    fresh_populate torch.empty + madvise(MADV_POPULATE_WRITE) of each thread's half (Linux >= 5.14):
                   the faults taken up front, spread over the threads
    cached         varkernels.core._grad_buffers.grad_buffer_like (a buffer freed before comes back)

Rounds are interleaved (every strategy once per round). Rows go to benchmarks/results/local/grad_buffers.csv
(git-ignored) or, with --save, benchmarks/results/grad_buffers.csv.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    RESULTS,
    append_csv,
    arg_parser,
    disable_thp_for_process,
    git_revision,
    load_average,
    machine_info,
    measure_interleaved,
    memory_state,
    run_id,
    start_run,
)

from varkernels.core._grad_buffers import grad_buffer_like, release_grad_buffers  # noqa: E402

MADV_HUGEPAGE, MADV_POPULATE_WRITE = 14, 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _madvise(t: torch.Tensor, advice: int, lo: int = 0, hi: int | None = None) -> int:
    page = 4096
    begin = t.data_ptr() + lo
    end = t.data_ptr() + (t.numel() * t.element_size() if hi is None else hi)
    a, b = (begin + page - 1) // page * page, end // page * page
    return _libc.madvise(a, b - a, advice) if b > a else 0


def populate_parallel(t: torch.Tensor, threads: int) -> None:
    """MADV_POPULATE_WRITE of equal slices from ``threads`` threads (ctypes releases the GIL)."""
    n = t.numel() * t.element_size()
    cuts = [n * i // threads for i in range(threads + 1)]
    workers = [threading.Thread(target=_madvise, args=(t, MADV_POPULATE_WRITE, cuts[i], cuts[i + 1]))
               for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main(argv=None):
    p = arg_parser(__doc__, B=8, T=512, V=32000)
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--thp-disable", action="store_true", help="prctl(PR_SET_THP_DISABLE, 1) for this process")
    p.add_argument("--save", action="store_true")
    args = p.parse_args(argv)
    if args.thp_disable and not disable_thp_for_process():
        raise SystemExit("--thp-disable: prctl(PR_SET_THP_DISABLE, 1) failed")
    start_run()
    x = torch.randn(args.B, args.T, args.V)
    touched = torch.empty_like(x)
    touched.fill_(0.0)
    threads = torch.get_num_threads()
    keep = []  # the last buffer stays alive until the next round's setup, as a .grad does

    def step(make):
        def run():
            buf = make()
            torch.exp(x, out=buf)
            keep.append(buf)
        return run

    def drop():
        keep.clear()

    def fresh_madvise():
        t = torch.empty_like(x)
        _madvise(t, MADV_HUGEPAGE)
        return t

    def fresh_populate():
        t = torch.empty_like(x)
        populate_parallel(t, threads)
        return t

    calls = {
        "touched": (step(lambda: touched), drop),
        "fresh": (step(lambda: torch.empty_like(x)), drop),
        "fresh_madvise": (step(fresh_madvise), drop),
        "fresh_populate": (step(fresh_populate), drop),
        "cached": (step(lambda: grad_buffer_like(x)), drop),
    }
    run = run_id()
    print(f"buffer {x.numel() * 4 / 2**20:.0f} MiB; {args.reps} interleaved rounds; load {load_average()}; "
          f"{memory_state()}")
    res = measure_interleaved(calls, reps=args.reps)
    release_grad_buffers()
    rows, load = [], load_average()
    floor = res["touched"]["median_s"]
    for name, r in res.items():
        if isinstance(r, Exception):
            print(f"{name}: failed {r}")
            continue
        print(f"{name:16s} {r['median_s'] * 1e3:8.1f} ms (p20 {r['p20_s'] * 1e3:.1f}, p80 {r['p80_s'] * 1e3:.1f}) "
              f"= write + {(r['median_s'] - floor) * 1e3:.1f} ms")
        rows.append({"run": run, **machine_info(), "git": git_revision(), "load_avg_1min": load, "strategy": name,
                     "B": args.B, "T": args.T, "V": args.V, "bytes": x.numel() * 4, "median_s": r["median_s"],
                     "p20_s": r["p20_s"], "p80_s": r["p80_s"], "reps": r["reps"],
                     "over_touched_s": r["median_s"] - floor, "first_call_s": r["first_call_s"]})
    path = RESULTS / "grad_buffers.csv" if args.save else RESULTS / "local" / "grad_buffers.csv"
    append_csv(path, rows)
    print(f"rows of run {run} appended to {path}")


if __name__ == "__main__":
    main()
