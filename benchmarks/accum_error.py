"""Error of the fused-linear weight gradient by accumulator dtype (``grad_accum_dtype``), bf16 weights.

    python benchmarks/accum_error.py          # rows to results/local/accum_error.csv (git-ignored)
    python benchmarks/accum_error.py --save   # rows to results/accum_error.csv (committed)

Max |grad − truth| / max |truth| of the weight gradient, truth in float64 from the same bf16 inputs,
for the fp32 accumulator (default), the bf16 accumulator at several chunk counts, and PyTorch's own
bf16 autograd (the yardstick of the tolerance policy: ≤ 2× PyTorch's error).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, append_csv, arg_parser, machine_info, run_id  # noqa: E402

import varkernels  # noqa: E402
from varkernels.reference import linear_var_loss_reference  # noqa: E402


def main(argv=None):
    p = arg_parser(__doc__, B=4, T=128, H=64, V=2000)
    p.add_argument("--chunks", default="512,64,16", help="chunk sizes (rows)")
    p.add_argument("--save", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    B, T, H, V = args.B, args.T, args.H, args.V
    labels = torch.randint(0, V, (B, T))
    R, Q = torch.randn(B, B), -1 - torch.rand(B, B)
    hidden = torch.randn(B, T, H).bfloat16()
    weight = (torch.randn(V, H) / 8).bfloat16()
    w64 = weight.double().requires_grad_()
    linear_var_loss_reference(hidden.double(), w64, labels, R.double(), Q.double()).backward()
    scale = float(w64.grad.abs().max())

    def rel_err(g):
        return float((g.double() - w64.grad).abs().max()) / scale

    wr = weight.clone().requires_grad_()
    linear_var_loss_reference(hidden, wr, labels, R, Q).backward()
    rows = [dict(method="pytorch bf16 autograd", accum="-", chunk="-", n_chunks="-", rel_err=rel_err(wr.grad))]
    for chunk in (int(c) for c in args.chunks.split(",")):
        for acc in (torch.float32, torch.bfloat16):
            w = weight.clone().requires_grad_()
            varkernels.fused_linear_var_loss(hidden, w, labels, R, Q, chunk_size=chunk, grad_accum_dtype=acc).backward()
            rows.append(dict(method="varkernels", accum=str(acc).replace("torch.", ""), chunk=chunk,
                             n_chunks=-(-B * T // chunk), rel_err=rel_err(w.grad)))
    run = run_id()
    info = machine_info()
    for r in rows:
        print(f"{r['method']:24s} accum={r['accum']:9s} chunks={r['n_chunks']!s:4s} rel_err={r['rel_err']:.2e}")
        r.update(run=run, B=B, T=T, H=H, V=V, command="python benchmarks/accum_error.py", **info)
    path = RESULTS / ("accum_error.csv" if args.save else "local/accum_error.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    append_csv(path, rows)
    print(f"rows of run {run} appended to {path}")


if __name__ == "__main__":
    main()
