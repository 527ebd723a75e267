"""The GPU suite: parity on CUDA, then times and peak memory of varkernels and every installed peer.

    bash benchmarks/gpu_suite.sh                 # on a CUDA machine: parity, then the timings
    bash benchmarks/gpu_suite.sh --dry-run       # any machine: imports and the plan, no GPU touched
    python benchmarks/gpu_suite.py --providers varkernels liger --tokens 8192   # a subset

1. Parity (stops at the first mismatch, exit status 1, before anything is timed). Every Triton path
   on CUDA tensors against ``varkernels.reference`` with the tolerance policy of tests/helpers.py
   (error vs a float64 truth ≤ 2 × PyTorch's own error in the same dtype + a small atol):
   ``fused_var_loss``, ``sequence_logps`` and ``fused_linear_var_loss`` with backend="triton" in
   fp32 / bf16 / fp16 at V ∈ {1000, 32003, 128256} (the single-pass token kernel, rows on chip, and
   the tiled one), all-ignored rows, softcap, temperature, "sum" reduction, shifted labels; and the
   two token kernels launched directly (tests/test_single_pass.py's launcher and checks).
2. Timings. At the heads of point 2 of the GPU work — Llama-3-8B (H=4096, V=128256) and Gemma-2-2B
   (H=2304, V=256000) — with 8192 and 32768 tokens (B=8 sequences, 25% prompt), bf16: forward +
   backward of the VAR loss of every provider of benchmarks/peers.py that is installed and runs on
   CUDA, fused-linear form (hidden + lm-head weight) and logits form (logits of the same V and
   tokens). ``triton.testing.do_bench`` (median, p20, p80 in ms over ``--rep`` ms of calls after
   ``--warmup`` ms) and ``torch.cuda.max_memory_allocated`` beyond the inputs during one call
   (gradients included). A provider that runs out of memory gets a row with status "oom".
   torch.compile(naive) and cce[torch_compile] are left out by default: their compilation at four
   shapes would take most of the time budget (``--providers all`` includes them).
3. Output: rows appended to benchmarks/results/gpu_suite.csv (run id, GPU name, versions), a plot
   benchmarks/results/gpu_suite.png, and a printed table with the roofline ESTIMATE beside each
   measured time. The estimate is read from ``--roofline-csv`` (default
   benchmarks/results/cost_model.csv, written by the cost model of the CUDA path) when that file
   exists, else "n/a". Rows of that CSV are matched on the columns it has of provider, form, H, V,
   tokens and dtype; the estimate is the first of est_ms_<arch>, est_us_<arch>, est_ms, est_us
   (<arch> = sm_90 / sm_80 of the GPU the suite runs on; with a ``gpu`` or ``arch`` column, rows of
   another GPU are ignored). It is always printed as an estimate.

``--dry-run`` checks the imports and prints the plan (parity cases, the timing matrix, which peers
are installed); it does not touch a GPU, writes nothing and claims no GPU time. The full run is
meant to take under 8 minutes on one H100; that has not been measured here (no GPU).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.py: the tolerance policy and input builders

RESULTS = HERE / "results"
CSV = RESULTS / "gpu_suite.csv"
PLOT = RESULTS / "gpu_suite.png"
ROOFLINE_CSV = RESULTS / "cost_model.csv"

HEADS = {"llama3-8b": (4096, 128256), "gemma2-2b": (2304, 256000)}  # name: (H, V)
TOKENS = (8192, 32768)
SEQUENCES = 8  # B: rows of the B×B reward / reference matrices; T = tokens / B
DEFAULT_EXCLUDED = ("torch.compile(naive)", "cce[torch_compile]")  # compile time, see the docstring
FIELDS = [
    "run", "date", "gpu", "arch", "torch", "triton", "varkernels", "liger_kernel", "cut_cross_entropy",
    "part", "form", "provider", "head", "B", "T", "tokens", "H", "V", "dtype", "status", "reason",
    "median_ms", "p20_ms", "p80_ms", "peak_extra_bytes", "est_ms", "est_source",
]


# ----------------------------------------------------------------------------------------------
# the plan


def parity_cases() -> list:
    """[(op, dtype name, shape dict, options dict)] of part 1, in the order they run."""
    cases = []
    for dt in ("float32", "bfloat16", "float16"):
        for B, T, V in ((4, 33, 1000), (2, 17, 32003), (2, 9, 128256)):
            cases.append(("fused_var_loss", dt, dict(B=B, T=T, V=V), {}))
        for opts in (dict(ignored_rows=(0,)), dict(softcap=30.0, temperature=1.3), dict(temperature=0.7),
                     dict(logp_reduction="sum"), dict(shift_labels=True)):
            cases.append(("fused_var_loss", dt, dict(B=3, T=11, V=1000), opts))
        cases.append(("fused_var_loss", dt, dict(B=2, T=5, V=32003), dict(softcap=30.0)))
        for reduction in ("mean", "sum", "none"):
            for V in (1000, 32003):
                cases.append(("sequence_logps", dt, dict(B=3, T=9, V=V), dict(reduction=reduction, softcap=5.0,
                                                                               shift_labels=True)))
        for mode in ("var", "logps_fwd", "logps_bwd"):
            for kernel in ("single", "tiled"):
                cases.append(("token_kernel", dt, dict(B=3, T=5, V=32003 if dt == "float32" else 16003),
                              dict(mode=mode, kernel=kernel)))
        cases.append(("token_kernel", dt, dict(B=2, T=5, V=1000), dict(mode="var", kernel="single", softcap=8.0)))
    for dt in ("float32", "bfloat16"):
        for B, T, H, V in ((3, 11, 33, 1001), (2, 64, 256, 32003)):
            cases.append(("fused_linear_var_loss", dt, dict(B=B, T=T, H=H, V=V), {}))
        cases.append(("fused_linear_var_loss", dt, dict(B=3, T=11, H=33, V=1001), dict(softcap=2.5, temperature=0.8)))
    return cases


def timing_matrix(args) -> list:
    """[(form, head, H, V, tokens, dtype name)] of part 2."""
    return [(form, head, *HEADS[head], tokens, dt)
            for dt in args.dtypes for head in args.heads for tokens in args.tokens for form in args.forms]


def select_providers(all_names, wanted) -> list:
    if wanted == ["all"]:
        return list(all_names)
    if not wanted:
        return [n for n in all_names if n not in DEFAULT_EXCLUDED]
    return [n for n in all_names if any(w == n or (w not in all_names and w in n) for w in wanted)]


# ----------------------------------------------------------------------------------------------
# roofline estimates (cost model CSV)


def read_roofline(path: Path, arch: str) -> list:
    """Rows of the cost-model CSV, or [] when it does not exist."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        tag = (r.get("arch") or r.get("gpu") or "").lower()
        named = {"sm_90": "h100", "sm_80": "a100"}.get(arch, arch)
        if tag and arch not in tag and named not in tag:
            continue
        out.append(r)
    return out


def roofline_estimate(rows: list, arch: str, **key) -> tuple:
    """(estimate in ms, source column) of the first row matching ``key`` on the columns it has, or (None, "n/a")."""
    for r in rows:
        if any(k in r and r[k] not in ("", None) and str(r[k]) != str(v) for k, v in key.items()):
            continue
        for col, scale in ((f"est_ms_{arch}", 1.0), (f"est_us_{arch}", 1e-3), ("est_ms", 1.0), ("est_us", 1e-3)):
            if r.get(col) not in (None, ""):
                try:
                    return float(r[col]) * scale, col
                except ValueError:
                    continue
    return None, "n/a"


# ----------------------------------------------------------------------------------------------
# part 1: parity


def parity_one(op, dt_name, shape, opts, device="cuda") -> None:
    """One parity case on ``device`` (CUDA; "cpu" under TRITON_INTERPRET=1 for the suite's own
    tests); raises AssertionError on a mismatch."""
    import torch
    from helpers import IGNORE_INDEX, assert_close, lp_atol, make_labels, make_logits, make_pairs, reference_run

    from varkernels import fused_linear_var_loss, fused_var_loss, sequence_logps
    from varkernels.reference import linear_var_loss_reference, sequence_logps_reference

    def _cuda(*ts):  # the inputs are built on the CPU (seeded), then moved
        return [t.to(device) if t is not None else None for t in ts]

    dtype = getattr(torch, dt_name)
    g = torch.Generator().manual_seed(0)
    if op == "fused_var_loss":
        opts = dict(opts)
        ignored = opts.pop("ignored_rows", ())
        B, T, V = shape["B"], shape["T"], shape["V"]
        labels = make_labels(B, T, V, ignored_rows=ignored, generator=g)
        logits = make_logits(B, T, V, dtype, labels=torch.where(labels == IGNORE_INDEX, 0, labels), generator=g)
        rewards, ref_logps = make_pairs(labels, logp_reduction=opts.get("logp_reduction", "mean"), generator=g)
        logits, labels, rewards, ref_logps = _cuda(logits.detach(), labels, rewards, ref_logps)
        x = logits.clone().requires_grad_(True)
        out = fused_var_loss(x, labels, rewards, ref_logps, return_aux=True, backend="triton", **opts)
        out.loss.backward()
        ref, ref_g = reference_run(logits, labels, rewards, ref_logps, **opts)
        truth, truth_g = reference_run(logits, labels, rewards, ref_logps, float64=True, **opts)
        eff = labels
        if opts.get("shift_labels"):
            eff = torch.full_like(labels, IGNORE_INDEX)
            eff[:, :-1] = labels[:, 1:]
        n = (eff != IGNORE_INDEX).sum(1).double()
        c_n = n if opts.get("logp_reduction", "mean") == "sum" else (n > 0).double()
        floors = {"loss": lp_atol(truth.weights.double() * c_n / B), "policy_logps": lp_atol(c_n.max())}
        for field in ("loss", "weights", "log_z", "policy_logps", "ess"):
            assert_close(getattr(out, field), getattr(ref, field), getattr(truth, field), name=field,
                         atol_floor=floors.get(field, 0.0))
        assert x.grad is not None and x.grad.dtype == dtype
        assert_close(x.grad, ref_g, truth_g, name="logits grad")
    elif op == "sequence_logps":
        B, T, V = shape["B"], shape["T"], shape["V"]
        x64 = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(device)
        y = torch.randint(0, V, (B, T), generator=g)
        y[0, :3] = IGNORE_INDEX
        y[2] = IGNORE_INDEX
        y = y.to(device)

        def run(fn, dt, **extra):
            xx = x64.detach().to(dt).clone().requires_grad_()
            out = fn(xx, y, **opts, **extra)
            probe = torch.linspace(-1, 2, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
            (out * probe).sum().backward()
            return out, xx.grad

        truth, tg = run(sequence_logps_reference, torch.float64)
        same, sg = run(sequence_logps_reference, dtype)
        out, og = run(sequence_logps, dtype, backend="triton")
        assert_close(out, same, truth, name="logps")
        assert_close(og, sg, tg, name="grad")
    elif op == "token_kernel":
        import test_single_pass as sp

        x, labels, coef = sp._inputs(shape["B"], shape["T"], shape["V"], dtype)
        x, labels, coef = _cuda(x, labels, coef)
        sp._check(x, labels, coef, mode=opts["mode"], kernel=opts["kernel"], softcap=opts.get("softcap"))
    elif op == "fused_linear_var_loss":
        B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
        h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
        W = torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5 * 2
        b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5
        y = torch.randint(0, V, (B, T), generator=g)
        y[:, : T // 3] = IGNORE_INDEX
        if B > 2:
            y[B - 1] = IGNORE_INDEX
        R = torch.randn(B, B, generator=g)
        Q = -torch.rand(B, B, generator=g) * 3
        h, W, b, y, R, Q = _cuda(h, W, b, y, R, Q)

        def run(fn, dt, **kw):
            ts = [t.detach().to(dt).clone().requires_grad_() for t in (h, W, b)]
            out = fn(ts[0], ts[1], y, R, Q, bias=ts[2], return_aux=True, **kw)
            out.loss.backward()
            return out, [t.grad for t in ts]

        truth, tg = run(linear_var_loss_reference, torch.float64, **opts)
        same, sg = run(linear_var_loss_reference, dtype, **opts)
        out, og = run(fused_linear_var_loss, dtype, backend="triton", **opts)
        for field in ("loss", "policy_logps", "weights"):
            assert_close(getattr(out, field), getattr(same, field), getattr(truth, field), name=field)
        for name, o, t, s in zip(("grad_hidden", "grad_weight", "grad_bias"), og, tg, sg):
            assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
            assert_close(o, s, t, name=name)
    else:
        raise ValueError(op)


def run_parity(cases, device="cuda") -> bool:
    print(f"\n== 1. parity of the Triton paths on {device} against varkernels.reference ({len(cases)} cases)")
    t0 = time.perf_counter()
    for i, (op, dt, shape, opts) in enumerate(cases, 1):
        label = f"{op} {dt} " + " ".join(f"{k}={v}" for k, v in {**shape, **opts}.items())
        try:
            parity_one(op, dt, shape, opts, device)
        except AssertionError as e:
            print(f"   [{i}/{len(cases)}] MISMATCH {label}\n{e}")
            print("   stopped: nothing is timed while a Triton path disagrees with the reference")
            return False
        print(f"   [{i}/{len(cases)}] ok {label}")
    print(f"   all {len(cases)} cases agree ({time.perf_counter() - t0:.0f} s)")
    return True


# ----------------------------------------------------------------------------------------------
# part 2: timings


def _bench(fn, reset, warmup, rep):
    """do_bench quantiles of ``fn`` and its peak memory beyond what is allocated before a call
    (after a warm-up call, whose compilation / autotuning buffers are not counted; the previous
    call's gradients are dropped by ``reset`` first, so the new ones count)."""
    import torch
    import triton

    fn()
    reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return dict(median_ms=med, p20_ms=p20, p80_ms=p80, peak_extra_bytes=peak)


def run_timings(args, run, base_row, arch) -> list:
    import torch
    from peers import get_providers, make_inputs

    roofline = read_roofline(Path(args.roofline_csv), arch)
    print(f"\n== 2. forward + backward on {base_row['gpu']}: triton.testing.do_bench (median ms, p20-p80) and "
          f"torch.cuda.max_memory_allocated beyond the inputs; roofline ESTIMATE from "
          f"{args.roofline_csv if roofline else 'n/a (no cost-model CSV)'}")
    rows = []
    for form, head, H, V, tokens, dt_name in timing_matrix(args):
        dtype = getattr(torch, dt_name)
        B, T = SEQUENCES, tokens // SEQUENCES
        everyone = get_providers(form, "cuda")
        names = select_providers([p.name for p in everyone], args.providers)
        providers = [p for p in everyone if p.name in names]
        x = make_inputs(form, B, T, V, dtype, "cuda", H=H)
        print(f"-- {form} {head} H={H} V={V} tokens={tokens} (B={B} T={T}) {dt_name}")
        for p in providers:
            row = {**base_row, "part": "time", "form": form, "provider": p.name, "head": head, "B": B, "T": T,
                   "tokens": tokens, "H": H if form == "linear" else "", "V": V, "dtype": dt_name}
            est, src = roofline_estimate(roofline, arch, provider=p.name, form=form, H=H, V=V, tokens=tokens,
                                         dtype=dt_name)
            row.update(est_ms="" if est is None else f"{est:.4g}", est_source=src)
            if not p.runnable:
                rows.append({**row, "status": "skipped", "reason": p.skip})
                print(f"   {p.name:28s} skipped: {p.skip}")
                continue
            xi = x.clone() if p.overwrites_input else x

            def step(p=p, xi=xi):
                xi.zero_grad()
                p.loss(xi).backward()

            try:
                m = _bench(step, xi.zero_grad, args.warmup, args.rep)
            except torch.cuda.OutOfMemoryError as e:
                rows.append({**row, "status": "oom", "reason": str(e).splitlines()[0][:200]})
                print(f"   {p.name:28s} out of memory")
            except Exception as e:  # noqa: BLE001 - a provider failing at one size is a row, not a crash
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append({**row, "status": "failed", "reason": reason})
                print(f"   {p.name:28s} failed: {type(e).__name__}: {e}")
            else:
                rows.append({**row, "status": "ok", **{k: f"{v:.6g}" for k, v in m.items()}})
            finally:
                xi.zero_grad()
                del xi
                torch.cuda.empty_cache()
        del x
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# output


def table(rows) -> str:
    """The printed table: measured time and memory, with the roofline estimate beside the time."""
    head = (f"{'form':6s} {'head':10s} {'tokens':>6s} {'dtype':8s} {'provider':28s} {'median ms':>10s} "
            f"{'p20-p80 ms':>15s} {'peak GB':>8s} {'est. ms':>9s} {'meas/est':>8s}")
    out = [head, "-" * len(head)]
    for r in rows:
        if r.get("part") != "time":
            continue
        est = r.get("est_ms") or "n/a"
        if r["status"] != "ok":
            out.append(f"{r['form']:6s} {r['head']:10s} {r['tokens']:>6} {r['dtype']:8s} {r['provider']:28s} "
                       f"{r['status']:>10s} {'':>15s} {'':>8s} {est:>9s}")
            continue
        med = float(r["median_ms"])
        ratio = f"{med / float(r['est_ms']):.2f}" if r.get("est_ms") else "n/a"
        out.append(f"{r['form']:6s} {r['head']:10s} {r['tokens']:>6} {r['dtype']:8s} {r['provider']:28s} "
                   f"{med:10.2f} {float(r['p20_ms']):7.2f}-{float(r['p80_ms']):<7.2f} "
                   f"{float(r['peak_extra_bytes']) / 1e9:8.2f} {est:>9s} {ratio:>8s}")
    out.append("(est. ms: roofline ESTIMATE of the cost model, not a measurement; n/a without its CSV)")
    return "\n".join(out)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("part") == "time" and r["status"] == "ok"]
    if not ok:
        return
    configs = list(dict.fromkeys((r["form"], r["head"], r["tokens"], r["dtype"]) for r in ok))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(configs)), 8))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    width = 0.8 / max(1, len(providers))
    for k, (ax, key, label) in enumerate(((axes[0], "median_ms", "forward + backward, ms (do_bench median)"),
                                          (axes[1], "peak_extra_bytes", "peak memory beyond inputs, GB"))):
        for j, name in enumerate(providers):
            xs, ys = [], []
            for i, c in enumerate(configs):
                r = next((r for r in ok if (r["form"], r["head"], r["tokens"], r["dtype"]) == c
                          and r["provider"] == name), None)
                if r is not None:
                    xs.append(i + j * width)
                    ys.append(float(r[key]) / (1e9 if k else 1.0))
            ax.bar(xs, ys, width, label=name)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
        ax.set_xticklabels([f"{f}\n{h}\n{t} tok {d}" for f, h, t, d in configs], fontsize=7)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    axes[0].set_title(f"GPU suite, {ok[0]['gpu']} (measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def append_csv(path: Path, rows: list) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


# ----------------------------------------------------------------------------------------------


def dry_run(args) -> int:
    """Imports and the plan; touches no GPU and writes nothing."""
    import test_single_pass  # noqa: F401  (the token-kernel launcher and checks of part 1)
    import torch
    import triton
    from helpers import assert_close  # noqa: F401
    from peers import get_providers, peer_versions

    import varkernels  # noqa: F401
    from varkernels import fused_linear_var_loss, fused_var_loss, sequence_logps  # noqa: F401
    from varkernels.core import _triton_kernels as K
    from varkernels.reference import var_loss_reference  # noqa: F401

    print(f"gpu_suite --dry-run: imports ok (torch {torch.__version__}, triton {triton.__version__}, "
          + ", ".join(f"{k} {v}" for k, v in peer_versions().items()) + ")")
    print("   no GPU is touched and nothing is written in a dry run")
    cases = parity_cases()
    by_op = {}
    for op, *_ in cases:
        by_op[op] = by_op.get(op, 0) + 1
    print(f"\n1. parity on CUDA, stop on the first mismatch: {len(cases)} cases ("
          + ", ".join(f"{op} {n}" for op, n in by_op.items()) + ")")
    for V in (1000, 16003, 32003, 128256):
        kernel, block, nw = K.token_kernel_config(V, torch.bfloat16)
        print(f"   bf16 V={V}: token kernel {getattr(kernel, 'fn', kernel).__name__} BLOCK_V={block} num_warps={nw}")
    matrix = timing_matrix(args)
    print(f"\n2. timings: {len(matrix)} configurations × providers, do_bench(warmup={args.warmup} ms, "
          f"rep={args.rep} ms) + max_memory_allocated")
    for form in args.forms:
        everyone = get_providers(form, "cuda")
        names = select_providers([p.name for p in everyone], args.providers)
        print(f"   form {form}:")
        for p in everyone:
            if p.name not in names:
                print(f"      {p.name:28s} not selected" + (" (default: compile time)" if p.name in DEFAULT_EXCLUDED
                                                           else ""))
            elif p.skip:
                print(f"      {p.name:28s} would be skipped: {p.skip}")
            else:
                print(f"      {p.name:28s} installed: {p.description}")
    for form, head, H, V, tokens, dt in matrix:
        print(f"   {form:6s} {head:10s} H={H} V={V} tokens={tokens} (B={SEQUENCES} T={tokens // SEQUENCES}) {dt}")
    rl = Path(args.roofline_csv)
    print(f"\n3. output: {args.csv} (rows), {args.plot} (plot), a printed table; roofline estimates from "
          f"{rl if rl.is_file() else 'n/a: ' + str(rl) + ' does not exist yet'}")
    print(f"   CUDA available here: {torch.cuda.is_available()} (a real run needs it)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="check imports and print the plan; no GPU, no output")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    p.add_argument("--forms", nargs="+", default=["linear", "logits"], choices=["linear", "logits"])
    p.add_argument("--providers", nargs="*", default=None,
                   help='exact names or substrings; "all" for every provider (default: all but '
                        + ", ".join(DEFAULT_EXCLUDED) + ")")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time, ms")
    p.add_argument("--parity-only", action="store_true")
    p.add_argument("--csv", default=str(CSV))
    p.add_argument("--plot", default=str(PLOT))
    p.add_argument("--roofline-csv", default=str(ROOFLINE_CSV))
    args = p.parse_args(argv)
    for t in args.tokens:
        if t % SEQUENCES:
            p.error(f"--tokens: each value must be a multiple of B={SEQUENCES}, got {t}")
    if args.dry_run:
        return dry_run(args)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_suite: TRITON_INTERPRET=1 is set: the Triton kernels would run in the interpreter, and their "
              "times would measure it; unset it for a GPU run", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "--dry-run for the plan", file=sys.stderr)
        return 2
    import triton
    from peers import peer_versions

    cap = torch.cuda.get_device_capability()
    arch = f"sm_{cap[0]}{cap[1]}"
    run = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    base_row = {"run": run, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "gpu": torch.cuda.get_device_name(), "arch": arch, "torch": torch.__version__,
                "triton": triton.__version__, **peer_versions()}
    print(f"gpu_suite run {run}: {base_row['gpu']} ({arch}), torch {torch.__version__}, triton {triton.__version__}")
    t0 = time.perf_counter()
    try:
        ok = run_parity(parity_cases())
    except Exception:  # noqa: BLE001 - an error in a Triton path is a failure of part 1 as well
        traceback.print_exc()
        ok = False
    if not ok:
        append_csv(Path(args.csv), [{**base_row, "part": "parity", "status": "failed",
                                     "reason": "a Triton path disagrees with the reference on CUDA"}])
        return 1
    n_cases = len(parity_cases())
    append_csv(Path(args.csv), [{**base_row, "part": "parity", "status": "ok", "reason": f"{n_cases} cases"}])
    if args.parity_only:
        return 0
    rows = run_timings(args, run, base_row, arch)
    append_csv(Path(args.csv), rows)
    plot(rows, Path(args.plot))
    print("\n" + table(rows))
    print(f"\nrows of run {run} appended to {args.csv}; plot {args.plot} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
