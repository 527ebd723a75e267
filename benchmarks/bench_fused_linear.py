"""Fused-linear VAR loss vs naive (hidden @ W.T, then the naive loss), forward+backward.

    python benchmarks/bench_fused_linear.py                       # B=4 T=512 H=2048 V=32000 fp32
    python benchmarks/bench_fused_linear.py --dtype bfloat16

Reports median / p20 / p80 wall time, the time of the three matmuls neither can avoid
(logits = h·Wᵀ, grad_h = g·W, grad_W = gᵀ·h, timed bare on the same shapes) and the ratio to
them, and the peak memory beyond the inputs and their gradients. Every label is a response
token here (--prompt-frac 0), so the fused path's row compaction does not flatter it.
Rows are appended to benchmarks/results/fused_linear.csv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    RESULTS,
    append_csv,
    arg_parser,
    fmt_bytes,
    machine_info,
    peak_memory_bytes,
    start_run,
    time_fn,
)

from tools.naive import naive_linear_var_loss  # noqa: E402
from varkernels import fused_linear_var_loss  # noqa: E402
from varkernels._backend import resolve_backend  # noqa: E402


def main(argv=None):
    p = arg_parser(__doc__, B=4, T=512, H=2048, V=32000)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt-frac", type=float, default=0.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--csv", default=str(RESULTS / "fused_linear.csv"))
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start_run()
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.B, a.T, a.H, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(a.V, a.H, generator=g) / a.H**0.5).to(device, dtype).requires_grad_()
    labels = torch.randint(0, a.V, (a.B, a.T), generator=g)
    labels[:, : int(a.T * a.prompt_frac)] = -100
    labels = labels.to(device)
    rewards = torch.randn(a.B, a.B, generator=g).to(device)
    ref_logps = (-2 - torch.rand(a.B, a.B, generator=g)).to(device)
    grads_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    auto = resolve_backend("auto", hidden.device)

    h2 = hidden.detach().reshape(-1, a.H)
    w = weight.detach()
    gl = torch.randn(h2.shape[0], a.V, generator=g).to(device, dtype)

    def matmuls():
        h2 @ w.t()
        gl @ w
        gl.t() @ h2

    providers = {
        "naive": lambda: naive_linear_var_loss(hidden, weight, labels, rewards, ref_logps).backward(),
        "fused": lambda: fused_linear_var_loss(hidden, weight, labels, rewards, ref_logps,
                                               chunk_size=a.chunk_size).backward(),
    }
    print(f"config: B={a.B} T={a.T} H={a.H} V={a.V} {a.dtype} on {device}; fused backend auto={auto}; "
          f"inputs' gradients {fmt_bytes(grads_bytes)}; {a.reps} reps")
    t_mm = time_fn(matmuls, warmup=1, reps=a.reps, device=device)
    rows = []
    for name, fn in providers.items():
        def step():
            hidden.grad = weight.grad = None
            fn()
        step()
        hidden.grad = weight.grad = None
        mem = peak_memory_bytes(step, device) - grads_bytes
        t = time_fn(step, warmup=0, reps=a.reps, device=device)
        rows.append({**machine_info(), "provider": name, "B": a.B, "T": a.T, "H": a.H, "V": a.V, "dtype": a.dtype,
                     "device": device, **t, "matmuls_s": t_mm["median_s"], "peak_extra_bytes": mem})
    naive = rows[0]
    ms = {k: t_mm[k] * 1e3 for k in ("median_s", "p20_s", "p80_s")}
    print(f"three bare matmuls: {ms['median_s']:.0f} ms (p20 {ms['p20_s']:.0f}, p80 {ms['p80_s']:.0f})")
    print(f"{'provider':10s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'x naive':>8s} {'x matmuls':>10s} "
          f"{'peak beyond inputs+grads':>25s} {'x naive':>8s}")
    for r in rows:
        print(f"{r['provider']:10s} {r['median_s']*1e3:10.0f} {r['p20_s']*1e3:8.0f} {r['p80_s']*1e3:8.0f} "
              f"{r['median_s']/naive['median_s']:7.2f}x {r['median_s']/t_mm['median_s']:9.2f}x "
              f"{fmt_bytes(r['peak_extra_bytes']):>25s} {r['peak_extra_bytes']/naive['peak_extra_bytes']:7.2f}x")
    append_csv(Path(a.csv), rows)
    print(f"rows appended to {a.csv}")


if __name__ == "__main__":
    main()
