"""C++ CPU backend vs the PyTorch alternatives: forward+backward of the VAR loss on logits.

    python benchmarks/bench_cpu_backend.py                      # B=8 T=512 V=32000 and B=2 T=512 V=128256, fp32
    python benchmarks/bench_cpu_backend.py --configs 8x512x32000 --reps 11 --plot

Providers (each a full forward + backward, gradient left in ``logits.grad``):
    fused_cpu          fused_var_loss(backend="cpu")                the C++ kernel of csrc/
    fused_cpu_inplace  fused_var_loss(backend="cpu", inplace=True)  gradient written over the logits
    fused_torch        fused_var_loss(backend="torch")              the chunked PyTorch path
    naive_eager        tools/naive.py: log_softmax + gather + masked mean + weights, autograd
    naive_compile      torch.compile(naive_var_loss) (skipped, with the reason, if it fails)

Timing (_harness.measure_interleaved): one warm-up call per provider, then every rep runs every
provider once, in turn ("alternating runs", so a slow phase of a shared machine hits all of them
alike); median and 20th/80th percentiles of wall time, default torch threads. The in-place
provider gets fresh logits copied in before each call, outside the timed region.

Peak memory: extra resident memory of one call beyond what is resident before it (VmHWM after
resetting it through /proc/self/clear_refs, see _harness.peak_memory_bytes), gradient included;
glibc's mmap threshold is fixed first (_harness.fix_mmap_threshold) so freed tensors leave RSS.

Floor of this machine, for the same logits: the sum of the medians of one max sweep
(``x.amax(-1)``: one read), one exp sweep (``torch.exp(x, out=buf)``: read + write, ``buf``
already faulted in) and one scale sweep (``buf.mul_(s)``: read + write in place), timed in the
same alternating rounds as the providers. Each provider's median is printed as a multiple of it.

Rows (machine, versions, load average, config, provider, times, memory, ratios) are appended to
benchmarks/results/cpu_backend.csv; ``--plot`` draws benchmarks/results/cpu_backend.png from it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    RESULTS,
    append_csv,
    arg_parser,
    floor_sweeps,
    fmt_bytes,
    grad_resets,
    machine_info,
    measure_interleaved,
    read_rows,
    start_run,
)
from bench_var_loss import make_inputs  # noqa: E402

from tools.naive import naive_var_loss  # noqa: E402
from varkernels import fused_var_loss  # noqa: E402
from varkernels.csrc_loader import load_extension  # noqa: E402

PROVIDERS = ("fused_cpu", "fused_cpu_inplace", "fused_torch", "naive_eager", "naive_compile")
LABELS = {
    "fused_cpu": "fused, backend=cpu",
    "fused_cpu_inplace": "fused, backend=cpu, inplace",
    "fused_torch": "fused, backend=torch",
    "naive_eager": "naive eager",
    "naive_compile": "torch.compile(naive)",
}
# Targets of the CPU-backend issue at B=8, T=512, V=32000 fp32: (provider, compared with, min speedup)
TARGETS = (
    ("fused_cpu", "naive_eager", 3.0),
    ("fused_cpu_inplace", "naive_eager", 4.0),
    ("fused_cpu", "naive_compile", 1.0),
)
MAX_FLOOR_RATIO = 2.0


def build_providers(logits, labels, rewards, ref_logps, names):
    """name -> (prepare, step): prepare() runs untimed before each timed step()."""
    work, clear, refill = grad_resets(logits)  # work: the in-place provider's logits, refilled per rep
    out, skipped = {}, {}
    for name in names:
        if name == "fused_cpu":
            out[name] = (clear, lambda: fused_var_loss(logits, labels, rewards, ref_logps, backend="cpu").backward())
        elif name == "fused_cpu_inplace":
            out[name] = (refill, lambda: fused_var_loss(
                work, labels, rewards, ref_logps, backend="cpu", inplace=True).backward())
        elif name == "fused_torch":
            out[name] = (clear, lambda: fused_var_loss(logits, labels, rewards, ref_logps, backend="torch").backward())
        elif name == "naive_eager":
            out[name] = (clear, lambda: naive_var_loss(logits, labels, rewards, ref_logps).backward())
        elif name == "naive_compile":
            compiled = torch.compile(naive_var_loss)
            try:
                t0 = time.perf_counter()
                clear()
                compiled(logits, labels, rewards, ref_logps).backward()
                print(f"  torch.compile(naive): compiled and ran once in {time.perf_counter() - t0:.1f} s")
            except Exception as e:  # no compiler for inductor, unsupported op, ...
                skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            out[name] = (clear, lambda: compiled(logits, labels, rewards, ref_logps).backward())
        else:
            raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return out, skipped


def run_config(B, T, V, dtype, names, reps, csv_path):
    logits, labels, rewards, ref_logps = make_inputs(B, T, V, dtype, "cpu")
    logits_bytes = logits.numel() * logits.element_size()
    print(f"\nconfig: B={B} T={T} V={V} {str(dtype).replace('torch.', '')}; logits {fmt_bytes(logits_bytes)}; "
          f"forward+backward; {reps} alternating reps")
    providers, skipped = build_providers(logits, labels, rewards, ref_logps, names)
    for name, why in skipped.items():
        print(f"  {LABELS[name]}: skipped ({why})")

    # warm-up, peak memory, then reps rounds of one timed call per provider and per floor sweep
    calls = {name: (step, prepare) for name, (prepare, step) in providers.items()}
    calls.update(floor_sweeps(logits))
    results = measure_interleaved(calls, reps=reps)
    floor = {k.replace("sweep_", ""): results.pop(k)["median_s"] for k in ("sweep_max", "sweep_exp", "sweep_scale")}
    floor_s = sum(floor.values())
    for name, r in list(results.items()):
        if isinstance(r, Exception):
            skipped[name] = f"{type(r).__name__}: {str(r).splitlines()[0][:200]}"
            print(f"  {LABELS[name]}: failed ({skipped[name]})")
            del results[name]
    stats = {name: {k: r[k] for k in ("median_s", "p20_s", "p80_s", "reps")} for name, r in results.items()}
    peaks = {name: r["peak_extra_bytes"] for name, r in results.items()}

    print(f"  floor: max sweep {floor['max'] * 1e3:.1f} ms + exp sweep {floor['exp'] * 1e3:.1f} ms + "
          f"scale sweep {floor['scale'] * 1e3:.1f} ms = {floor_s * 1e3:.1f} ms")
    base = stats.get("naive_eager")
    print(f"  {'provider':30s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'x floor':>8s} {'vs naive':>9s} "
          f"{'peak extra':>11s} {'x logits':>9s}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name, st in stats.items():
        speedup = base["median_s"] / st["median_s"] if base else float("nan")
        print(f"  {LABELS[name]:30s} {st['median_s'] * 1e3:10.1f} {st['p20_s'] * 1e3:8.1f} {st['p80_s'] * 1e3:8.1f} "
              f"{st['median_s'] / floor_s:7.2f}x {speedup:8.2f}x {fmt_bytes(peaks[name]):>11s} "
              f"{peaks[name] / logits_bytes:8.2f}x")
        rows.append({**machine_info(), "load_avg_1min": round(load, 2), "provider": name, "B": B, "T": T, "V": V,
                     "dtype": str(dtype).replace("torch.", ""), **st, "peak_extra_bytes": peaks[name],
                     "peak_extra_x_logits": peaks[name] / logits_bytes, "floor_s": floor_s,
                     "x_floor": st["median_s"] / floor_s, "speedup_vs_naive_eager": speedup,
                     "cpu_kernel_isa": load_extension().capability()})
    for name in skipped:
        rows.append({**machine_info(), "load_avg_1min": round(load, 2), "provider": name, "B": B, "T": T, "V": V,
                     "dtype": str(dtype).replace("torch.", ""), "median_s": "", "p20_s": "", "p80_s": "",
                     "reps": 0, "peak_extra_bytes": "", "peak_extra_x_logits": "", "floor_s": floor_s,
                     "x_floor": "", "speedup_vs_naive_eager": "", "cpu_kernel_isa": f"skipped: {skipped[name]}"})
    append_csv(csv_path, rows)
    return stats, floor_s


def check_targets(stats, floor_s):
    print("  targets (issue: B=8 T=512 V=32000 fp32):")
    for name, other, factor in TARGETS:
        if name in stats and other in stats:
            s = stats[other]["median_s"] / stats[name]["median_s"]
            ok = "PASS" if s >= factor else "FAIL"
            print(f"    {ok}  {LABELS[name]} is {s:.2f}x faster than {LABELS[other]} (target >= {factor:g}x)")
    if "fused_cpu" in stats:
        r = stats["fused_cpu"]["median_s"] / floor_s
        print(f"    {'PASS' if r <= MAX_FLOOR_RATIO else 'FAIL'}  {LABELS['fused_cpu']} is {r:.2f}x the floor "
              f"(target <= {MAX_FLOOR_RATIO:g}x)")


def plot(csv_path: Path, out: Path) -> None:
    """The latest row of each provider and config: time and peak memory (benchmarks/plot.py's plot_latest)."""
    from plot import plot_latest

    rows = [r for r in read_rows(csv_path) if r["median_s"]]  # skipped providers have no time
    for w in plot_latest(rows, out.parent, out.name, "bench_cpu_backend.py: VAR loss on CPU", ("B", "T", "V", "dtype")):
        print(f"plot written to {w}")


def main(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--configs", default="8x512x32000,2x512x128256",
                   help="comma-separated BxTxV (default: the issue's size and V=128256 at the same logits size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--csv", default=str(RESULTS / "cpu_backend.csv"))
    p.add_argument("--plot", action="store_true", help="draw benchmarks/results/cpu_backend.png from the CSV")
    args = p.parse_args(argv)

    ext = load_extension(required=True)
    start_run()
    print(f"C++ kernel: {ext.capability()}; load average {os.getloadavg() if hasattr(os, 'getloadavg') else '-'}")
    dtype = getattr(torch, args.dtype)
    names = [n for n in args.providers.split(",") if n]
    for cfg in args.configs.split(","):
        B, T, V = (int(v) for v in cfg.lower().split("x"))
        stats, floor_s = run_config(B, T, V, dtype, names, args.reps, Path(args.csv))
        if (B, T, V, args.dtype) == (8, 512, 32000, "float32"):
            check_targets(stats, floor_s)
    print(f"\nload average after: {os.getloadavg() if hasattr(os, 'getloadavg') else '-'}; rows appended to {args.csv}")
    if args.plot:
        plot(Path(args.csv), Path(args.csv).with_suffix(".png"))


if __name__ == "__main__":
    main()
