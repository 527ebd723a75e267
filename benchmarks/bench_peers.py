"""varkernels against the alternatives a user could pick, side by side in one run.

    python benchmarks/bench_peers.py --threads 1     # the full run: 6.5 min here (12.5 min under heavier load)
    python benchmarks/bench_peers.py --quick         # a smoke run at small sizes (~1-2 min)
    python benchmarks/bench_peers.py --report        # markdown tables of the last run in the CSV

Providers (tools/peers.py): naive eager PyTorch; torch.compile(naive); varkernels on each
backend; VAR built on Liger-Kernel (its cross-entropy / fused-linear cross-entropy with
reduction="none", and its chunked-loss log-prob piece) and on Cut Cross-Entropy
(linear_cross_entropy(..., reduction="none"), impl "cce" and "torch_compile") and on PyTorch's own
chunked torch.nn.functional.linear_cross_entropy(..., reduction="none",
options=torch.nn.LinearCrossEntropyOptions()) (torch >= 2.13). A provider that
cannot run here gets a CSV row with status "skipped" and the reason, printed as well.

Part "time" (this process): forward + backward of the whole loss, upstream gradient 1, over
    form logits: B=4, T ∈ {128, 512}, V ∈ {32000, 128256}, fp32 and bf16
    form linear: B=2, T ∈ {128, 256}, H=512, V ∈ {32000, 128256}, fp32 and bf16
  (H=512 keeps the three B·T×H×V matmuls of the fused-linear form within minutes on 2 cores; with
  a real model's H the matmuls take a larger share and the differences between providers shrink)
  (25% of every row is prompt, label -100). On CPU: median / p20 / p80 wall time of --reps calls
  after one warm-up call (first_call_s: compilation included), the timed calls of one config going
  round-robin over the providers so that a change of load on a shared machine hits all of them;
  the peak memory beyond the inputs (outputs and gradients included) from /proc VmHWM, with glibc's
  mmap threshold fixed so it counts live tensors, measured on an untimed call made with varkernels'
  gradient-buffer cache emptied, so that the gradient it hands back is counted (benchmarks/_harness.py). On CUDA:
  triton.testing.do_bench and torch.cuda.max_memory_allocated, and the Triton providers run.
  Before timing, every provider's loss and gradients are checked against naive eager.
Part "traffic" (a subprocess with TRITON_INTERPRET=1; docs/design.md §4.3, no GPU needed): bytes moved by one
  forward + backward of the logits-input loss at the same B, T, V, dtype — Triton kernels counted
  load by load in the interpreter plus the aten ops around them (tools.traffic), naive
  eager counted as bytes in + out of every aten op — for varkernels[triton], liger[ce] and naive.
  Counted at T=2 and T=4 and extrapolated linearly in T (benchmarks/gpu_measures.py, where the
  linearity is checked), with every token a target. From the bytes, a roofline ESTIMATE of GPU
  time = bytes / peak DRAM bandwidth (A100 2.0 TB/s, H100 SXM 3.35 TB/s): a lower bound, never a
  measurement.

Rows go to benchmarks/results/peers.csv with a run id, the machine, versions, config and date;
benchmarks/plot.py draws benchmarks/results/*.png from it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")  # inductor's own deprecations
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import (  # noqa: E402
    RESULTS,
    append_csv,
    arg_parser,
    fix_mmap_threshold,
    fmt_bytes,
    machine_info,
    machine_line,
    measure_interleaved,
    read_rows,
    run_id,
)

from tools.peers import check_providers, get_providers, interpreting, make_inputs, peer_versions, selected  # noqa: E402

CSV = RESULTS / "peers.csv"
FIELDS = [
    "run", "date", "cpu", "threads", "torch", "triton", "python", "gpu", "varkernels", "liger_kernel",
    "cut_cross_entropy", "load_1min", "part", "form", "provider", "B", "T", "H", "V", "dtype", "device", "status",
    "reason",
    "check_loss_rel_err", "check_grad_rel_err", "median_s", "p20_s", "p80_s", "reps", "first_call_s",
    "peak_extra_bytes", "tokens_per_s", "counted_bytes", "bytes_method", "floor_bytes", "bytes_x_naive",
    "est_us_sm_80", "est_us_sm_90", "est_note",
]
FULL = dict(logits=dict(B=4, T=[128, 512]), linear=dict(B=2, T=[128, 256], H=512),
            V=[32000, 128256], dtypes=["float32", "bfloat16"])
QUICK = dict(logits=dict(B=2, T=[32, 64]), linear=dict(B=2, T=[32, 64], H=128), V=[32000], dtypes=["float32"])
TRAFFIC_PROVIDERS = ("naive", "varkernels[triton]", "liger[ce]")


def base_row(run: str, device: str) -> dict:
    row = dict.fromkeys(FIELDS, "")
    row.update({k: v for k, v in machine_info().items() if k in FIELDS})
    row.update(peer_versions())
    row.update(run=run, device=device, load_1min=f"{os.getloadavg()[0]:.1f}")
    return row


# ----------------------------------------------------------------------------------------------
# part "time"


def sweep_sizes(args) -> dict:
    base = QUICK if args.quick else FULL
    sizes = {"logits": dict(base["logits"]), "linear": dict(base["linear"]), "V": args.V or base["V"],
             "dtypes": args.dtypes or base["dtypes"]}
    if args.T:
        sizes["logits"]["T"] = sizes["linear"]["T"] = args.T
    if args.B:
        sizes["logits"]["B"] = sizes["linear"]["B"] = args.B
    if args.H:
        sizes["linear"]["H"] = args.H
    return sizes


def run_time(args, run: str) -> list:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and fix_mmap_threshold(1 << 20):
        print("glibc mmap threshold fixed at 1 MiB (benchmarks/_harness.py fix_mmap_threshold): the peak "
              "resident set counts live tensors")
    sizes = sweep_sizes(args)
    rows = []
    for form in args.forms:
        for dtype_name in sizes["dtypes"]:
            dtype = getattr(torch, dtype_name)
            everyone = get_providers(form, device)
            providers = [p for p in everyone if selected(p.name, args.providers, [q.name for q in everyone])]
            checks = check_providers(form, providers, device=device, dtype=dtype)
            print(f"\n== form {form}, {dtype_name}: agreement with naive eager (B=2 T=16 V=1000; "
                  "rel. err of loss, max rel. err of gradients)")
            for name, c in checks.items():
                print(f"   {name:22s} " + (c if isinstance(c, str) else f"loss {c[0]:.1e}  grads {c[1]:.1e}"))
            for p in providers:
                if not p.runnable:
                    print(f"   {p.name:22s} skipped: {p.skip}")
            B, H = sizes[form]["B"], sizes[form].get("H", "")
            for V in sizes["V"]:
                for T in sizes[form]["T"]:
                    x = make_inputs(form, B, T, V, dtype, device, H=H or 512)
                    shape = f"B={B} T={T}" + (f" H={H}" if H else "") + f" V={V} {dtype_name}"
                    print(f"-- {form} {shape}: inputs {fmt_bytes(x.input_bytes)}")
                    print(f"   {'provider':22s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'x naive':>8s} "
                          f"{'peak extra':>11s} {'x naive':>8s} {'1st call s':>10s}")
                    runnable = [p for p in providers if p.runnable]
                    # a provider that writes into its logits (Liger's CE) gets its own copy of the inputs
                    own = {p.name: x.clone() if p.overwrites_input else x for p in runnable}
                    results = measure_interleaved(
                        {p.name: (lambda p=p, x=own[p.name]: p.loss(x).backward(), own[p.name].zero_grad)
                         for p in runnable},
                        device, reps=args.reps, fresh_buffers=True)
                    del own
                    naive = results.get("naive") if isinstance(results.get("naive"), dict) else None
                    for p in providers:
                        row = {**base_row(run, device), "part": "time", "form": form, "provider": p.name,
                               "B": B, "T": T, "H": H, "V": V, "dtype": dtype_name}
                        c = checks.get(p.name)
                        if isinstance(c, tuple):
                            row.update(check_loss_rel_err=f"{c[0]:.2e}", check_grad_rel_err=f"{c[1]:.2e}")
                        if not p.runnable:
                            rows.append({**row, "status": "skipped", "reason": p.skip})
                            continue
                        m = results[p.name]
                        if isinstance(m, Exception):  # a provider failing at one size is a row, not a crash
                            reason = f"raised at this size: {type(m).__name__}: {str(m).splitlines()[0][:200]}"
                            print(f"   {p.name:22s} {reason}")
                            rows.append({**row, "status": "failed", "reason": reason})
                            continue
                        row.update(status="ok", **m, tokens_per_s=x.tokens / m["median_s"])
                        rows.append(row)
                        tx = naive["median_s"] / m["median_s"] if naive else float("nan")
                        base_peak = naive["peak_extra_bytes"] if naive else 0
                        mx = m["peak_extra_bytes"] / base_peak if base_peak > 0 else float("nan")
                        print(f"   {p.name:22s} {m['median_s']*1e3:10.1f} {m['p20_s']*1e3:8.1f} {m['p80_s']*1e3:8.1f} "
                              f"{tx:7.2f}x {fmt_bytes(m['peak_extra_bytes']):>11s} {mx:7.2f}x "
                              f"{m['first_call_s']:10.1f}")
                    del x
    print("   (x naive: naive's time / provider's time — above 1 is faster; peak: provider's / naive's)")
    return rows


# ----------------------------------------------------------------------------------------------
# part "traffic" (runs with TRITON_INTERPRET=1)


def run_traffic(args, run: str) -> list:
    if not interpreting():
        raise RuntimeError("the traffic part counts Triton kernels in the interpreter: run it with TRITON_INTERPRET=1 "
                           "(python benchmarks/bench_peers.py runs it so in a subprocess)")
    from tools import gpu_estimates  # counters, linear-in-T extrapolation, assumed bandwidths
    from tools.traffic import count_aten_traffic, count_triton_traffic

    sizes = sweep_sizes(args)
    B = sizes["logits"]["B"]
    providers = {p.name: p for p in get_providers("logits", "cpu")}
    t1, t2 = gpu_estimates.COUNT_T
    bw = {arch: gpu.dram_bytes_per_s for arch, gpu in gpu_estimates.GPUS.items()}
    note = "roofline ESTIMATE = bytes / peak DRAM bandwidth (" + ", ".join(
        f"{arch} {gpu.name} {gpu.dram_bytes_per_s / 1e12:.2f} TB/s" for arch, gpu in gpu_estimates.GPUS.items()
    ) + "); not measured"
    method = f"counted at B={B}, T={t1} and T={t2} (every token a target), extrapolated linearly in T"

    def liger_bytes(T, V, dtype):
        logits, labels, rewards, ref_logps = gpu_estimates.make_inputs(B, T, V, dtype)
        x = make_inputs("logits", 1, 1, 2, dtype)  # a shell; filled with gpu_estimates' inputs
        x.logits, x.labels, x.rewards, x.ref_logps = logits, labels, rewards, ref_logps
        with count_triton_traffic() as kernels, count_aten_traffic() as glue:
            providers["liger[ce]"].loss(x).backward()
        return kernels.total + glue.total

    rows = []
    print("\n== Triton providers in the interpreter: agreement with naive eager (B=2 T=16 V=1000 H=64)")
    for form in args.forms:
        for dtype_name in sizes["dtypes"]:
            triton_providers = [p for p in get_providers(form, "cpu") if p.uses_triton]
            checks = check_providers(form, triton_providers, dtype=getattr(torch, dtype_name))
            for p in triton_providers:
                row = {**base_row(run, "cpu (Triton interpreter)"), "part": "check", "form": form,
                       "provider": p.name, "B": 2, "T": 16, "H": 64 if form == "linear" else "", "V": 1000,
                       "dtype": dtype_name}
                c = checks.get(p.name)
                if isinstance(c, tuple):
                    row.update(status="ok", check_loss_rel_err=f"{c[0]:.2e}", check_grad_rel_err=f"{c[1]:.2e}")
                    print(f"   {form:6s} {dtype_name:9s} {p.name:20s} loss {c[0]:.1e}  grads {c[1]:.1e}")
                else:
                    row.update(status="failed" if c else "skipped", reason=p.skip)
                    print(f"   {form:6s} {dtype_name:9s} {p.name:20s} {row['status']}: {p.skip}")
                rows.append(row)

    print(f"\n== traffic of the logits-input loss, forward + backward ({method})")
    print(f"   {note}")
    print(f"   {'shape':34s} {'provider':20s} {'counted MB':>11s} {'x naive':>8s} {'x floor':>8s} "
          f"{'est A100 us':>11s} {'est H100 us':>11s}")
    for dtype_name in sizes["dtypes"]:
        dtype = getattr(torch, dtype_name)
        for V in sizes["V"]:
            for T in sizes["logits"]["T"]:
                b = gpu_estimates.extrapolated_bytes(B, T, V, dtype)
                counted = {"naive": b["naive_bytes"],
                           "varkernels[triton]": b["fused_kernel_bytes"] + b["fused_glue_bytes"]}
                liger = providers["liger[ce]"]
                if liger.skip is None:
                    c1, c2 = liger_bytes(t1, V, dtype), liger_bytes(t2, V, dtype)
                    counted["liger[ce]"] = round(c1 + (c2 - c1) / (t2 - t1) * (T - t1))
                floor = 2 * B * T * V * torch.empty((), dtype=dtype).element_size()
                for name in TRAFFIC_PROVIDERS:
                    row = {**base_row(run, "cpu (Triton interpreter)"), "part": "traffic", "form": "logits",
                           "provider": name, "B": B, "T": T, "V": V, "dtype": dtype_name}
                    if name not in counted:
                        rows.append({**row, "status": "skipped", "reason": providers[name].skip})
                        continue
                    n = counted[name]
                    row.update(status="ok", counted_bytes=n, bytes_method=method, floor_bytes=floor,
                               bytes_x_naive=n / counted["naive"], est_note=note,
                               **{f"est_us_{arch}": n / bw[arch] * 1e6 for arch in bw})
                    rows.append(row)
                    print(f"   B={B} T={T} V={V} {dtype_name:9s}{'':>5s} {name:20s} {n / 1e6:11.1f} "
                          f"{row['bytes_x_naive']:8.3f} {n / floor:8.2f} {row['est_us_sm_80']:11.0f} "
                          f"{row['est_us_sm_90']:11.0f}")
    print("   (floor: one read of the logits + one write of the gradient, docs/design.md §4.3; "
          "torch.compile(naive) and the C++ backend are not counted: their fused kernels are invisible to a "
          "per-aten-op counter)")
    return rows


# ----------------------------------------------------------------------------------------------
# report


def load_run(path: Path, run=None) -> list:
    rows = read_rows(path)
    if not rows:
        return []
    run = run or rows[-1]["run"]
    return [r for r in rows if r["run"] == run]


def report(path: Path, run=None) -> str:
    """Markdown tables of one run: time, peak memory, counted bytes, ratios to naive."""
    rows = load_run(path, run)
    if not rows:
        return "no rows"
    out = [f"run `{rows[0]['run']}` — {rows[0]['cpu']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}, "
           f"triton {rows[0]['triton']}, liger-kernel {rows[0]['liger_kernel']}, cut-cross-entropy "
           f"{rows[0]['cut_cross_entropy']}, gpu {rows[0]['gpu']}, {rows[0]['date'][:10]}"]
    traffic = {(r["B"], r["T"], r["V"], r["dtype"], r["provider"]): r
               for r in rows if r["part"] == "traffic" and r["status"] == "ok"}
    checks = [r for r in rows if r["part"] == "check"]
    if checks:
        out += ["", "Triton providers run in the interpreter on CPU tensors (B=2 T=16 V=1000), against naive eager:",
                ""]
        for r in checks:
            out.append(f"- {r['form']} {r['dtype']} {r['provider']}: " + (
                f"loss rel. err {r['check_loss_rel_err']}, gradients max rel. err {r['check_grad_rel_err']}"
                if r["status"] == "ok" else f"{r['status']} — {r['reason']}"))
    for form in ("logits", "linear"):
        timed = {(r["B"], r["T"], r["H"], r["V"], r["dtype"], r["provider"]): r
                 for r in rows if r["part"] == "time" and r["form"] == form and r["status"] == "ok"}
        if not timed:
            continue
        shapes = list(dict.fromkeys(k[:5] for k in timed))
        out.append(f"\n**form {form}** — forward + backward; time = median wall ms (p20–p80); "
                   "peak = memory beyond the inputs (gradients included); ×naive = naive's time / this time, "
                   "this peak / naive's peak"
                   + ("; bytes = counted traffic of the same call as GPU kernels (MB), ×naive, and its roofline "
                      "ESTIMATE on an H100 SXM at 3.35 TB/s" if form == "logits" else ""))
        head = "| shape | provider | time ms | ×naive | peak MiB | ×naive |" + (
            " bytes MB | ×naive | est. H100 µs |" if form == "logits" else "")
        out += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for shape in shapes:
            B, T, H, V, dt = shape
            label = f"B={B} T={T}" + (f" H={H}" if H else "") + f" V={V} {dt}"
            nv = timed.get((*shape, "naive"))
            names = [k[5] for k in timed if k[:5] == shape]
            if form == "logits":
                names += [k[4] for k in traffic if k[:4] == (B, T, V, dt) and k[4] not in names]
            for name in names:
                r = timed.get((*shape, name))
                if r is None:
                    line = f"| {label} | {name} | GPU kernel: not timed on CPU | | | |"
                else:
                    t, m = float(r["median_s"]), float(r["peak_extra_bytes"])
                    line = (f"| {label} | {name} | {t*1e3:,.0f} ({float(r['p20_s'])*1e3:,.0f}–"
                            f"{float(r['p80_s'])*1e3:,.0f}) | {float(nv['median_s']) / t:.2f} | {m / 2**20:,.0f} | "
                            f"{m / float(nv['peak_extra_bytes']):.2f} |")
                if form == "logits":
                    tr = traffic.get((B, T, V, dt, name))
                    line += (f" {float(tr['counted_bytes']) / 1e6:,.0f} | {float(tr['bytes_x_naive']):.3f} | "
                             f"{float(tr['est_us_sm_90']):,.0f} |" if tr else " – | | |")
                out.append(line)
        # varkernels (its fastest CPU backend) against each peer, per shape
        ours = [n for n in ("varkernels[cpu]", "varkernels[triton]", "varkernels[torch]")
                if any(k[5] == n for k in timed)]
        if ours:
            mine = ours[0]
            peers = [n for n in dict.fromkeys(k[5] for k in timed) if not n.startswith("varkernels")]
            out += ["", f"{mine} against each peer — peer's time / {mine}'s time, and peer's peak / {mine}'s peak "
                    "(above 1: varkernels is faster / smaller):", "",
                    "| shape | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
            for shape in shapes:
                B, T, H, V, dt = shape
                me = timed.get((*shape, mine))
                cells = []
                for name in peers:
                    r = timed.get((*shape, name))
                    if r is None or me is None:
                        cells.append("–")
                        continue
                    tm = float(r["median_s"]) / float(me["median_s"])
                    mine_peak = float(me["peak_extra_bytes"])
                    mm = f"{float(r['peak_extra_bytes']) / mine_peak:.2f}× mem" if mine_peak >= 2**20 else "mem n/a"
                    cells.append(f"{tm:.2f}× time, {mm}")
                out.append(f"| B={B} T={T}" + (f" H={H}" if H else "") + f" V={V} {dt} | " + " | ".join(cells) + " |")
        skipped = {}
        for r in rows:
            if r["form"] == form and r["status"] != "ok" and r["part"] != "check":
                skipped.setdefault((r["provider"], r["reason"]), set()).add(r["part"])
        if skipped:
            out.append("")
        for (name, reason), parts in skipped.items():
            out.append(f"- {name} (not in part {'/'.join(sorted(parts))}): {reason}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--part", choices=["all", "time", "traffic"], default="all")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--forms", nargs="+", default=["logits", "linear"], choices=["logits", "linear"])
    p.add_argument("--providers", nargs="*", default=None,
                   help="exact names, or substrings selecting every name containing them (default: all)")
    p.add_argument("--T", type=int, nargs="+", default=None, help="override the sweep's sequence lengths")
    p.add_argument("--V", type=int, nargs="+", default=None, help="override the sweep's vocabulary sizes")
    p.add_argument("--B", type=int, default=None, help="override the sweep's batch size (both forms)")
    p.add_argument("--H", type=int, default=None, help="override the fused-linear form's hidden size")
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the time part (default: torch's); 1 on a machine shared with "
                        "other jobs, where OpenMP barriers waiting on a busy core distort many-small-op providers")
    p.add_argument("--csv", default=str(CSV))
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # shared by the traffic subprocess
    p.add_argument("--report", action="store_true", help="print markdown tables of the last run in --csv")
    args = p.parse_args(argv)
    if args.report:
        print(report(Path(args.csv), args.run))
        return
    run = args.run or run_id() + ("-quick" if args.quick else "")
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "time"):
        print(machine_line() + f" | load average {os.getloadavg()[0]:.1f}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in peer_versions().items()))
        rows = run_time(args, run)
        append_csv(Path(args.csv), [{k: r.get(k, "") for k in FIELDS} for r in rows])
    if args.part == "traffic" or (args.part == "all" and "logits" in args.forms):
        if interpreting():
            rows = run_traffic(args, run)
            append_csv(Path(args.csv), [{k: r.get(k, "") for k in FIELDS} for r in rows])
        else:
            cmd = [sys.executable, __file__, "--part", "traffic", "--run", run, "--csv", args.csv]
            cmd += ["--quick"] if args.quick else []
            for key in ("B", "T", "V", "dtypes"):
                value = getattr(args, key)
                if value:
                    cmd += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
            subprocess.run(cmd, check=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    if args.part == "all" or (args.part == "time"):
        print(f"\nrows of run {run} appended to {args.csv} ({time.perf_counter() - t0:.0f} s); "
              f"tables: python benchmarks/bench_peers.py --report; plots: python benchmarks/plot.py")


if __name__ == "__main__":
    main()
