"""GPU cost model of the VAR loss and its peers: roofline ESTIMATES traced from the real code, no GPU.

    python benchmarks/cost_model.py                  # writes benchmarks/results/cost_model.csv, prints the table
    python benchmarks/cost_model.py --quick          # Llama-3-8B head at 8k tokens only (no CSV)

Each provider's computation of the loss and its gradients (forward + backward, every token a target,
upstream gradient 1) is run on fake CUDA tensors and every op recorded (tools.costmodel):

* traced: varkernels (its CUDA path: GEMMs and the token kernel, whose bytes the kernel declares),
  PyTorch's ``linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` (its chunked CUDA path:
  the forward and backward calls of its accumulator, options resolved as on an sm_80+ GPU), and
  naive (run with autograd on fake CPU tensors — autograd on fake CUDA tensors aborts a CPU build of
  torch — its aten ops are device-independent and costed as on the GPU);
* counted from the published algorithm (their Triton kernels and data-dependent host code cannot run
  on fake tensors): Liger-Kernel's fused-linear cross-entropy and cross-entropy, Cut Cross-Entropy.

Weights: "bf16" (bf16 weight, its gradient returned in bf16) or "fp32 master" (an fp32 master weight
cast to bf16 first, as the trainer does under autocast; the bf16 weight gradient cast back to fp32).
Every time printed or written is a roofline ESTIMATE for the named GPU at its datasheet peak rates
(docs/cost_model.md), never a measurement. Peak memory is beyond the inputs and the returned gradients.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, arg_parser, git_revision, machine_info  # noqa: E402

from tools import costmodel as cm  # noqa: E402
from tools.cost_providers import SHAPES, Case, rows_for  # noqa: E402

COMMAND = "python benchmarks/cost_model.py"


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--quick", action="store_true", help="Llama-3-8B head at 8k tokens, bf16 only; no CSV")
    ap.add_argument("--out", default=str(RESULTS / "cost_model.csv"))
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    gpus = [cm.H100_SXM, cm.A100_SXM]
    rows = []
    for head, tokens in shapes:
        for master in ((False,) if args.quick else (False, True)):
            rows += rows_for(Case(head, tokens, master), gpus)
    m = machine_info()
    extra = {"command": COMMAND, "revision": git_revision(), "torch": m["torch"], "date": m["date"]}
    rows = [{**r, **extra} for r in rows]
    print("GPU cost model: roofline ESTIMATES from traced/counted ops (no GPU was used)")
    hdr = (f"{'gpu':9} {'head':9} {'tokens':>6} {'weights':11} {'form':6} {'provider':36} {'est ms':>8} "
           f"{'x3GEMM':>6} {'peak+GB':>7}  method")
    print(hdr)
    for r in rows:
        print(f"{r['gpu']:9} {r['head']:9} {r['tokens']:>6} {r['weights']:11} {r['form']:6} {r['provider']:36} "
              f"{r['est_ms']:>8.2f} {str(r['ratio_vs_three_gemms']):>6} {r['peak_extra_gb']:>7.2f}  {r['method']}")
    if not args.quick:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
