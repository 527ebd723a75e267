"""One training step at the lm_head: OnlineVARTrainer's path against GRPOTrainer's own (TRL 1.16).

    python benchmarks/bench_online_head.py                   # N=B·T=2048 H=2048 V=32000, fp32 and bf16
    python benchmarks/bench_online_head.py --save            # append to the committed results/online_head.csv
    (one torch thread unless --threads)

Both start from the final hidden states [N, H] and the lm_head weight [V, H] and end with the
gradients of both (hidden → loss → backward), every token a completion token:

- ``online_var``: OnlineVARTrainer's loss, the weighted NLL −(1/N)·Σ_i w_i·mean_t lp[i,t] in the
  fused-linear form (varkernels' forward mode: per chunk of tokens the logits GEMM, the kernel that
  turns them into their gradient, and the two gradient GEMMs; three GEMMs, no second pass).
- ``grpo_trl``: what GRPOTrainer runs: TRL's chunked head (``trl.kernels.ChunkedLogProbFunction``,
  log-probs and entropy as ``add_fused_lm_head(outputs=("log_probs", "entropy"))`` requests, tiles of
  TRL's own sizes), then GRPO's default loss (``loss_type="dapo"``: −min(ρ·A, clip(ρ)·A) summed over
  tokens / their number, ρ = exp(lp − lp.detach())) and its backward, which recomputes the logits
  (four GEMMs).

Per-sequence weights / advantages are random (B = 8 sequences of T = 256). The calls are interleaved
(round-robin; ``_harness.measure_interleaved``); median / p20 / p80 wall time and the peak memory
beyond the inputs are written with the load average and the THP setting. Rows go to the git-ignored
results/local/online_head.csv unless --save.
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
    git_revision,
    load_average,
    machine_info,
    measure_interleaved,
    run_id,
    start_run,
    thp_mode,
)

SAVED_CSV = RESULTS / "online_head.csv"
LOCAL_CSV = RESULTS / "local" / "online_head.csv"  # git-ignored


def providers(hidden, weight, labels, w):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from varkernels import linear_weighted_nll

    B, T = labels.shape
    N, H = B * T, hidden.shape[-1]

    def online_var():
        linear_weighted_nll(hidden, weight, labels, w, reduction="mean").backward()

    def grpo_trl():
        lp, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden.reshape(N, H), weight, None, labels.reshape(N), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
            ("log_probs", "entropy"),
        )
        lp = lp.view(B, T)
        adv = w.unsqueeze(1)
        ratio = torch.exp(lp - lp.detach())
        per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - 0.2, 1 + 0.2) * adv)
        loss = per_token.sum() / N  # dapo: tokens of the batch; every token is a completion token here
        loss.backward()
        entropy.detach()  # GRPOTrainer logs it

    return {"online_var": online_var, "grpo_trl": grpo_trl}


def main(argv=None):
    p = arg_parser(__doc__, B=8, T=256, H=2048, V=32000)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--save", action="store_true", help="append to the committed results/online_head.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    start_run()
    run = run_id()
    csv_path = SAVED_CSV if a.save else LOCAL_CSV
    print(f"run {run}: N=B·T={a.B}·{a.T} H={a.H} V={a.V}; {a.reps} interleaved rounds; load {load_average()}; "
          f"THP {thp_mode()}")
    rows = []
    for dt in a.dtypes:
        dtype = getattr(torch, dt)
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(a.B, a.T, a.H, generator=g).to(dtype).requires_grad_()
        weight = (torch.randn(a.V, a.H, generator=g) / a.H**0.5).to(dtype).requires_grad_()
        labels = torch.randint(0, a.V, (a.B, a.T), generator=g)
        w = torch.rand(a.B, generator=g) * 2

        def reset():
            hidden.grad = weight.grad = None

        calls = {name: (fn, reset) for name, fn in providers(hidden, weight, labels, w).items()}
        load = load_average()
        res = measure_interleaved(calls, "cpu", reps=a.reps)
        for name, r in res.items():
            if isinstance(r, Exception):
                raise r
            rows.append({"run": run, **machine_info(), "revision": git_revision(), "load_avg_1min": load,
                         "thp": thp_mode(), "provider": name, "B": a.B, "T": a.T, "H": a.H, "V": a.V, "dtype": dt,
                         "median_s": r["median_s"], "p20_s": r["p20_s"], "p80_s": r["p80_s"], "reps": r["reps"],
                         "peak_extra_bytes": r["peak_extra_bytes"], "first_call_s": r["first_call_s"]})
        ours, theirs = res["online_var"], res["grpo_trl"]
        print(f"{dt}: online_var {ours['median_s']:.2f} s (p20 {ours['p20_s']:.2f}, p80 {ours['p80_s']:.2f}), "
              f"peak +{fmt_bytes(ours['peak_extra_bytes'])} | grpo_trl {theirs['median_s']:.2f} s (p20 "
              f"{theirs['p20_s']:.2f}, p80 {theirs['p80_s']:.2f}), peak +{fmt_bytes(theirs['peak_extra_bytes'])} | "
              f"grpo_trl / online_var = {theirs['median_s'] / ours['median_s']:.2f}x")
    append_csv(csv_path, rows)
    note = "" if a.save else " (git-ignored; --save for the committed CSV)"
    print(f"rows of run {run} appended to {csv_path}{note}")


if __name__ == "__main__":
    main()
