"""Main job: the fused VAR loss vs the naive PyTorch loss, forward + backward, time and peak memory.

    bash scripts/bench.sh                          # set-up, then this script: B=8 T=512 V=32000 fp32
    python benchmarks/bench_var_loss.py --V 128256 --T 128 --dtype bfloat16
    python benchmarks/bench_var_loss.py --save     # also append to the committed CSV, redraw the plot
    python benchmarks/bench_var_loss.py --thp-disable   # prctl(PR_SET_THP_DISABLE, 1): no huge pages here

Providers (each a full forward + backward of the loss, gradient left in ``logits.grad``):
    naive          tools/naive.py: log_softmax + gather + masked mean + weights, autograd
    fused          fused_var_loss(...)                 backend="auto" (the C++ kernel on CPU)
    fused_inplace  fused_var_loss(..., inplace=True)   gradient written over (a copy of) the logits
    fused_torch    fused_var_loss(..., backend="torch") the chunked PyTorch path

Timing (_harness.measure_interleaved): one warm-up call and one peak-memory call per provider, then
``--reps`` rounds in which every provider runs once, in turn. A busy phase of the shared machine
therefore hits every provider alike, and the ratios stay comparable where back-to-back timing of
one provider after another swings by 2x. Printed: median and the 20th-80th percentile range of wall
time, the ratio to naive (naive median / provider median: > 1 is faster), and the ratio to three unfused
sweeps over the logits (_harness.floor_sweeps: max, exp, scale, timed in the same rounds; a reference, not a
lower bound: the fused kernel beats it; CSV columns floor_s / x_floor). Peak memory: extra resident memory
of one call beyond what is resident before it, gradient included (_harness.peak_memory_bytes), also as a
multiple of the logits.
The fused providers' gradient buffer comes from varkernels' CPU gradient-buffer cache
(varkernels/core/_grad_buffers.py): between calls the cache holds the freed gradient's buffer, which is
therefore resident before each call; "held" is what it holds after the run, and "footprint" = peak extra
+ held is the memory the provider needs, as a multiple of the logits.

Rows (run id, machine, versions, load average, config, provider, times, memory, ratios) go to
benchmarks/results/local/var_loss.csv, which git ignores. ``--save`` appends them to the committed
benchmarks/results/var_loss.csv instead and redraws benchmarks/results/var_loss.png from that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    FLOOR_SWEEPS,
    RESULTS,
    append_csv,
    arg_parser,
    disable_thp_for_process,
    floor_sweeps,
    fmt_bytes,
    grad_resets,
    load_average,
    machine_info,
    measure_interleaved,
    run_id,
    start_run,
)

from tools.naive import naive_var_loss  # noqa: E402
from varkernels import fused_var_loss, grad_buffer_stats, release_grad_buffers  # noqa: E402
from varkernels._backend import resolve_backend  # noqa: E402

PROVIDERS = ("naive", "fused", "fused_inplace", "fused_torch")
CACHED = ("fused", "fused_torch")  # their gradient buffer comes from the gradient-buffer cache
LOCAL_CSV = RESULTS / "local" / "var_loss.csv"  # git-ignored
SAVED_CSV = RESULTS / "var_loss.csv"  # committed: README figures come from its rows


def make_inputs(B, T, V, dtype, device, prompt_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype=dtype, device=device).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : int(T * prompt_frac)] = -100
    rewards = torch.randn(B, B, generator=g)
    ref_logps = -2 - torch.rand(B, B, generator=g)
    return logits, labels.to(device), rewards.to(device), ref_logps.to(device)


def build_calls(names, logits, labels, rewards, ref_logps):
    """name -> (step, setup) for the harness; setup() runs untimed before every step()."""
    work, clear, refill = grad_resets(logits)  # work: the in-place provider's logits, refilled each call
    steps = {
        "naive": (lambda: naive_var_loss(logits, labels, rewards, ref_logps).backward(), clear),
        "fused": (lambda: fused_var_loss(logits, labels, rewards, ref_logps).backward(), clear),
        "fused_inplace": (lambda: fused_var_loss(work, labels, rewards, ref_logps, inplace=True).backward(), refill),
        "fused_torch": (lambda: fused_var_loss(logits, labels, rewards, ref_logps, backend="torch").backward(), clear),
    }
    unknown = [n for n in names if n not in steps]
    if unknown:
        raise SystemExit(f"--providers: unknown {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    return {n: steps[n] for n in names}


def main(argv=None):
    p = arg_parser(__doc__, B=8, T=512, V=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=11, help="timed rounds (every provider once per round)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--save", action="store_true",
                   help=f"append the rows to {SAVED_CSV.relative_to(RESULTS.parent.parent)} (committed) and "
                        "redraw var_loss.png from them, instead of the git-ignored results/local/")
    p.add_argument("--csv", default=None, help="write the rows to this CSV instead")
    p.add_argument("--thp-disable", action="store_true",
                   help="prctl(PR_SET_THP_DISABLE, 1) first: no transparent huge pages for this process (the "
                        "machine's setting is untouched); recorded in the rows' thp_disabled_process")
    args = p.parse_args(argv)
    if args.thp_disable and not disable_thp_for_process():
        raise SystemExit("--thp-disable: prctl(PR_SET_THP_DISABLE, 1) did not take effect on this OS")
    csv_path = Path(args.csv) if args.csv else SAVED_CSV if args.save else LOCAL_CSV
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start_run()
    dtype = getattr(torch, args.dtype)
    logits, labels, rewards, ref_logps = make_inputs(args.B, args.T, args.V, dtype, device)
    logits_bytes = logits.numel() * logits.element_size()
    auto = resolve_backend("auto", logits.device)
    names = [n for n in args.providers.split(",") if n]
    labels_of = {"naive": "naive eager", "fused": f"fused (auto={auto})",
                 "fused_inplace": f"fused, inplace (auto={auto})", "fused_torch": "fused (backend=torch)"}

    run = run_id()
    print(f"config: B={args.B} T={args.T} V={args.V} {args.dtype} on {device}; logits {fmt_bytes(logits_bytes)}; "
          f"forward+backward; {args.reps} interleaved rounds; load average {load_average()}")
    calls = build_calls(names, logits, labels, rewards, ref_logps)
    calls.update(floor_sweeps(logits))
    results = measure_interleaved(calls, device=device, reps=args.reps)
    held = grad_buffer_stats()["cached_bytes"] if device == "cpu" else 0
    release_grad_buffers()
    floor = {k: results.pop(k) for k in FLOOR_SWEEPS}
    floor_s = None if any(isinstance(v, Exception) for v in floor.values()) else sum(
        v["median_s"] for v in floor.values())
    failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
    for n, e in failed.items():
        print(f"{labels_of[n]}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    ok = {n: r for n, r in results.items() if n not in failed}
    base = ok.get("naive")

    if floor_s is not None:
        sweeps = " + ".join(f"{k.replace('sweep_', '')} {floor[k]['median_s'] * 1e3:.1f} ms" for k in FLOOR_SWEEPS)
        print(f"3 unfused sweeps (a reference, not a lower bound): {sweeps} = {floor_s * 1e3:.1f} ms")
    print(f"{'provider':30s} {'median ms':>10s} {'p20-p80 ms':>15s} {'x naive':>8s} {'x 3 sweeps':>10s} "
          f"{'peak extra':>11s} {'x logits':>9s} {'held':>9s} {'footprint':>10s}")
    load = load_average()
    rows = []

    def footprint(n, r):
        return r["peak_extra_bytes"] + (held if n in CACHED else 0)

    for n, r in ok.items():
        x_naive = base["median_s"] / r["median_s"] if base else float("nan")
        x_floor = r["median_s"] / floor_s if floor_s else float("nan")
        spread = f"{r['p20_s'] * 1e3:.1f}-{r['p80_s'] * 1e3:.1f}"
        print(f"{labels_of[n]:30s} {r['median_s'] * 1e3:10.1f} {spread:>15s} {x_naive:7.2f}x {x_floor:9.2f}x "
              f"{fmt_bytes(r['peak_extra_bytes']):>11s} {r['peak_extra_bytes'] / logits_bytes:8.2f}x "
              f"{fmt_bytes(held if n in CACHED else 0):>9s} {footprint(n, r) / logits_bytes:9.2f}x")
        rows.append({"run": run, **machine_info(), "load_avg_1min": load, "provider": n,
                     "backend": auto if n in ("fused", "fused_inplace") else ("torch" if n == "fused_torch" else "-"),
                     "B": args.B, "T": args.T, "V": args.V, "dtype": args.dtype, "device": device,
                     "median_s": r["median_s"], "p20_s": r["p20_s"], "p80_s": r["p80_s"], "reps": r["reps"],
                     "interleaved": True, "peak_extra_bytes": r["peak_extra_bytes"],
                     "peak_extra_x_logits": r["peak_extra_bytes"] / logits_bytes,
                     "grad_cache_held_bytes": held if n in CACHED else 0,
                     "footprint_x_logits": footprint(n, r) / logits_bytes,
                     "floor_s": floor_s if floor_s else "", "x_floor": x_floor if floor_s else "",
                     "speedup_vs_naive": x_naive if base else "", "first_call_s": r["first_call_s"]})
    print("x naive = naive median / provider median (> 1: faster than naive); "
          "x 3 sweeps = provider median / the 3 sweeps; "
          "held = the gradient-buffer cache after the run (resident before each call of fused / fused_torch); "
          "footprint = (peak extra + held) / logits")
    append_csv(csv_path, rows)
    print(f"rows of run {run} appended to {csv_path}" + ("" if args.save or args.csv else
                                                         " (git-ignored; --save appends to the committed CSV)"))
    if args.save and not args.csv:
        from plot import plot_var_loss

        for w in plot_var_loss(csv_path, csv_path.with_suffix(".png")):
            print(f"wrote {w}")
    return rows


if __name__ == "__main__":
    main()
