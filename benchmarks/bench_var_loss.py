"""Main job: fused VAR loss vs the naive PyTorch loss, forward+backward, time and peak memory.

    python benchmarks/bench_var_loss.py                 # B=8, T=512, V=32000, fp32 on CPU
    python benchmarks/bench_var_loss.py --V 128256 --T 128 --dtype bfloat16

Prints a table (median and 20/80 percentiles of wall time; extra peak memory beyond the
inputs, gradient included, as bytes and as a multiple of the logits' size) and appends the
rows to benchmarks/results/var_loss.csv with the machine, versions and config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    RESULTS,
    append_csv,
    fix_mmap_threshold,
    fmt_bytes,
    machine_info,
    machine_line,
    peak_memory_bytes,
    time_fn,
)
from naive import naive_var_loss  # noqa: E402

from varkernels import fused_var_loss  # noqa: E402
from varkernels._backend import resolve_backend  # noqa: E402


def make_inputs(B, T, V, dtype, device, prompt_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype=dtype, device=device).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : int(T * prompt_frac)] = -100
    rewards = torch.randn(B, B, generator=g)
    ref_logps = -2 - torch.rand(B, B, generator=g)
    return logits, labels.to(device), rewards.to(device), ref_logps.to(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--V", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--providers", default="naive,fused,fused_inplace,fused_torch")
    p.add_argument("--csv", default=str(RESULTS / "var_loss.csv"))
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fix_mmap_threshold()  # every tensor >= 1 MiB is mmap-ed: peak RSS counts live tensors
    dtype = getattr(torch, args.dtype)
    logits, labels, rewards, ref_logps = make_inputs(args.B, args.T, args.V, dtype, device)
    logits_bytes = logits.numel() * logits.element_size()
    auto = resolve_backend("auto", logits.device)

    providers = {
        "naive": lambda: naive_var_loss(logits, labels, rewards, ref_logps).backward(),
        "fused": lambda: fused_var_loss(logits, labels, rewards, ref_logps).backward(),
        "fused_inplace": lambda: fused_var_loss(logits, labels, rewards, ref_logps, inplace=True).backward(),
        "fused_torch": lambda: fused_var_loss(logits, labels, rewards, ref_logps, backend="torch").backward(),
    }
    labels_of = {"fused": f"fused (auto={auto})", "fused_inplace": f"fused inplace (auto={auto})",
                 "fused_torch": "fused (backend=torch)", "naive": "naive eager"}
    print(machine_line())
    print(f"config: B={args.B} T={args.T} V={args.V} {args.dtype} on {device}; logits {fmt_bytes(logits_bytes)}; "
          f"forward+backward, {args.reps} reps")
    rows = []
    for name in args.providers.split(","):
        fn = providers[name]

        def step():
            logits.grad = None
            fn()

        step()  # warm-up (JIT builds, allocator)
        logits.grad = None
        mem = peak_memory_bytes(step, device)
        t = time_fn(step, warmup=0, reps=args.reps, device=device)
        rows.append({**machine_info(), "provider": name, "B": args.B, "T": args.T, "V": args.V,
                     "dtype": args.dtype, "device": device, **t, "peak_extra_bytes": mem,
                     "peak_extra_x_logits": mem / logits_bytes})
    base = next((r for r in rows if r["provider"] == "naive"), None)
    head = ("provider", "median ms", "p20", "p80", "speedup", "peak extra", "x logits")
    print(f"{head[0]:32s} {head[1]:>10s} {head[2]:>8s} {head[3]:>8s} {head[4]:>8s} {head[5]:>12s} {head[6]:>9s}")
    for r in rows:
        sp = base["median_s"] / r["median_s"] if base else float("nan")
        print(f"{labels_of[r['provider']]:32s} {r['median_s']*1e3:10.1f} {r['p20_s']*1e3:8.1f} {r['p80_s']*1e3:8.1f} "
              f"{sp:7.2f}x {fmt_bytes(r['peak_extra_bytes']):>12s} {r['peak_extra_x_logits']:8.2f}x")
    append_csv(Path(args.csv), rows)
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
