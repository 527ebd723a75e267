"""Cross-pair reference scoring: prefix-shared KV cache vs scoring every pair separately.

    python benchmarks/bench_pairs.py                       # B=8, prompts 256 tokens, responses 48-64
    python benchmarks/bench_pairs.py --prompt-len 512 --response-len 128 --reps 5 --threads 2

Computes Q[i, j] = log π_ref(y_j | x_i) for a B×B micro-batch with ``cross_pair_logps`` on a
randomly initialised Llama (from a config; the weights do not change the cost):

    shared     share_prefix=True: the B prompts run once (one batch), then B² continuations of
               |y| tokens on copies of the prompt KV cache        ≈ B·|x| + B²·|y| positions
    per_pair   share_prefix=False: B² concatenated x_i ⊕ y_j       ≈ B²·(|x| + |y|) positions

Both use ``batch_size`` sequences per forward (default B: one row of Q per forward) and the
fused-linear log-prob path. Timing: warm-up, then the reps alternate between the two, median
and 20th/80th percentiles; the peak extra resident memory of one call. The script checks that
the two matrices agree, prints ``per_pair / shared`` as the speedup, and appends rows to
benchmarks/results/pairs.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    RESULTS,
    append_csv,
    fmt_bytes,
    machine_info,
    measure_interleaved,
    start_run,
)

from varkernels.training.pairs import cross_pair_logps  # noqa: E402


def build_model(args):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4 // 3 * 2,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.prompt_len + args.response_len + 8,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def make_lists(args):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt_len,), generator=g) for _ in range(args.batch)]
    lo = max(1, args.response_len * 3 // 4)
    responses = [
        torch.randint(0, args.vocab, (int(torch.randint(lo, args.response_len + 1, (1,), generator=g)),), generator=g)
        for _ in range(args.batch)
    ]
    return prompts, responses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="B: prompts and responses per micro-batch")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=64, help="longest response; the shortest is 3/4 of it")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default B)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start_run()
    model = build_model(args)
    prompts, responses = make_lists(args)
    opts = dict(batch_size=args.batch_size, progress=False)
    Q_shared = cross_pair_logps(model, prompts, responses, share_prefix=True, **opts)
    Q_pairs = cross_pair_logps(model, prompts, responses, share_prefix=False, **opts)
    max_diff = (Q_shared - Q_pairs).abs().max().item()

    calls = {
        "shared": (lambda: cross_pair_logps(model, prompts, responses, share_prefix=True, **opts), lambda: None),
        "per_pair": (lambda: cross_pair_logps(model, prompts, responses, share_prefix=False, **opts), lambda: None),
    }
    res = measure_interleaved(calls, reps=args.reps)
    for r in res.values():
        if isinstance(r, Exception):
            raise r

    n_params = sum(p.numel() for p in model.parameters())
    B, P, L = args.batch, args.prompt_len, args.response_len
    print(f"Llama {n_params / 1e6:.1f}M params (H={args.hidden}, layers={args.layers}, V={args.vocab}); "
          f"B={B}, |x|={P}, |y|={L * 3 // 4}..{L}, batch_size={args.batch_size or B}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"token positions run: shared ≈ {B * P + B * B * L:,}, per-pair ≈ {B * B * (P + L):,}")
    for name in ("shared", "per_pair"):
        r = res[name]
        print(f"  {name:9s} median {r['median_s'] * 1e3:8.1f} ms  (p20 {r['p20_s'] * 1e3:.1f}, "
              f"p80 {r['p80_s'] * 1e3:.1f})  peak extra {fmt_bytes(r['peak_extra_bytes'])}")
    ratio = res["per_pair"]["median_s"] / res["shared"]["median_s"]
    print(f"max |Q_shared - Q_per_pair| = {max_diff:.2e}")
    print(f"prefix-shared speedup at B={B}: per_pair / shared = {ratio:.2f}x")

    if not args.no_csv:
        info = machine_info()
        rows = [
            {**info, "load_avg": round(os.getloadavg()[0], 2), "B": B, "prompt_len": P, "response_len": L,
             "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
             "batch_size": args.batch_size or B, "provider": name, "median_s": res[name]["median_s"],
             "p20_s": res[name]["p20_s"], "p80_s": res[name]["p80_s"],
             "peak_extra_bytes": res[name]["peak_extra_bytes"], "speedup_vs_per_pair": res["per_pair"]["median_s"]
             / res[name]["median_s"], "max_abs_diff": max_diff}
            for name in ("shared", "per_pair")
        ]
        append_csv(RESULTS / "pairs.csv", rows)


if __name__ == "__main__":
    main()
