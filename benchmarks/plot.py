"""Plots drawn from the benchmark CSVs into benchmarks/results/*.png.

    python benchmarks/plot.py                 # the last run of peers.csv, and the other CSVs present
    python benchmarks/plot.py --run 20261123T153000

peers.csv (benchmarks/bench_peers.py), one run:
    peers_time.png     forward + backward wall time per provider (median, p20–p80 bars), log scale
    peers_memory.png   peak memory beyond the inputs per provider
    peers_traffic.png  counted bytes of the logits-input loss (naive, varkernels[triton], liger[ce])
                       against the floor (one read of the logits + one write of the gradient)
var_loss.csv (bench_var_loss.py --save): the rows of its last run → var_loss.png (time with the
    floor and the ratios the script printed, peak memory).
fused_linear.csv (bench_fused_linear.py): the latest row of each provider and config → fused_linear.png.
cpu_backend.csv (bench_cpu_backend.py): the latest row of each provider and config → cpu_backend.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import matplotlib
except ImportError as e:
    raise SystemExit('benchmarks/plot.py needs matplotlib: pip install "varkernels[bench]"') from e

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, arg_parser, read_rows  # noqa: E402

# one colour per provider, stable across figures
COLOURS = {
    "naive": "#7f7f7f", "torch.compile(naive)": "#bcbd22", "varkernels[cpu]": "#1f77b4",
    "varkernels[torch]": "#aec7e8", "varkernels[triton]": "#08306b", "liger[ce]": "#d62728",
    "liger[flce]": "#d62728", "liger[chunked]": "#ff9896", "cce[cce]": "#2ca02c", "cce[torch_compile]": "#98df8a",
}


LEGEND = dict(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # outside the axes, right


def shape_label(r: dict) -> str:
    dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(r["dtype"], r["dtype"])
    return f"T={r['T']}\nV={int(r['V']) // 1000}k {dt}"


def grouped_bars(ax, rows: list, value, err=None, log=False, ylabel="", label=shape_label):
    """Bars grouped by shape (x, named by ``label(row)``) with one bar per provider; ``value(row)`` gives the
    height, ``err(row)`` the (low, high) ends of its error bar."""
    shapes = list(dict.fromkeys(label(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / max(len(providers), 1)
    for k, name in enumerate(providers):
        xs, ys, lo, hi = [], [], [], []
        for r in rows:
            if r["provider"] != name:
                continue
            x = shapes.index(label(r)) + (k - (len(providers) - 1) / 2) * width
            y = value(r)
            xs.append(x)
            ys.append(y)
            if err:
                a, b = err(r)
                lo.append(y - a)
                hi.append(b - y)
        ax.bar(xs, ys, width, label=name, color=COLOURS.get(name), edgecolor="black", linewidth=0.3,
               yerr=[lo, hi] if err else None, capsize=2)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3, which="both")


def caption(rows: list) -> str:
    r = rows[0]
    return (f"run {r['run']} | {r['cpu']}, {r['threads']} threads | torch {r['torch']}, triton {r['triton']}, "
            f"liger-kernel {r['liger_kernel']}, cut-cross-entropy {r['cut_cross_entropy']} | gpu {r['gpu']} | "
            f"{r['date'][:10]}")


def plot_peers(rows: list, out: Path) -> list:
    written = []
    timed = [r for r in rows if r["part"] == "time" and r["status"] == "ok"]
    forms = [f for f in ("logits", "linear") if any(r["form"] == f for r in timed)]
    for what, fname in (("time", "peers_time.png"), ("memory", "peers_memory.png")):
        if not forms:
            break
        fig, axes = plt.subplots(len(forms), 1, figsize=(14, 4.2 * len(forms)), squeeze=False)
        for ax, form in zip(axes[:, 0], forms):
            fr = [r for r in timed if r["form"] == form]
            B, H = fr[0]["B"], fr[0]["H"]
            title = f"form {form}: B={B}" + (f", H={H}" if H else "") + ", forward + backward"
            if what == "time":
                grouped_bars(ax, fr, lambda r: float(r["median_s"]) * 1e3,
                             err=lambda r: (float(r["p20_s"]) * 1e3, float(r["p80_s"]) * 1e3), log=True,
                             ylabel=f"wall time, ms ({fr[0]['device']}; median, p20–p80)")
            else:
                grouped_bars(ax, fr, lambda r: max(float(r["peak_extra_bytes"]), 0) / 2**20,
                             ylabel="peak memory beyond inputs, MiB")
            ax.set_title(title, fontsize=10)
            ax.legend(**LEGEND)
        fig.suptitle(caption(rows), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)

    traffic = [r for r in rows if r["part"] == "traffic" and r["status"] == "ok"]
    if traffic:
        fig, ax = plt.subplots(figsize=(14, 4.8))
        grouped_bars(ax, traffic, lambda r: float(r["counted_bytes"]) / 1e6, log=True,
                     ylabel="bytes moved, MB (counted, no GPU)")
        shapes = list(dict.fromkeys(shape_label(r) for r in traffic))
        for r in traffic:
            if r["provider"] == "naive":
                i = shapes.index(shape_label(r))
                ax.hlines(float(r["floor_bytes"]) / 1e6, i - 0.42, i + 0.42, colors="black", linestyles="--",
                          label="floor: 1 read + 1 write" if i == 0 else None)
        for r in traffic:
            if r["provider"] != "naive":
                i = shapes.index(shape_label(r))
                k = list(dict.fromkeys(t["provider"] for t in traffic)).index(r["provider"])
                n = len(set(t["provider"] for t in traffic))
                x = i + (k - (n - 1) / 2) * 0.8 / n
                ax.annotate(f"{float(r['bytes_x_naive']):.2f}×", (x, float(r["counted_bytes"]) / 1e6),
                            ha="center", va="bottom", fontsize=7)
        B = traffic[0]["B"]
        ax.set_title(f"logits-input VAR loss, B={B}, forward + backward: bytes loaded + stored (Triton kernels "
                     f"counted in the interpreter, aten ops by a TorchDispatchMode; labels: × naive eager)\n"
                     f"{traffic[0]['bytes_method']}", fontsize=9)
        ax.legend(**LEGEND)
        fig.suptitle(caption(rows), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "peers_traffic.png", dpi=110)
        plt.close(fig)
        written.append(out / "peers_traffic.png")
    return written


def plot_latest(rows: list, out: Path, fname: str, title: str, config_keys: tuple) -> list:
    """The latest row of each (provider, config) of a lead's CSV: time and peak memory side by side."""
    if not rows:
        return []
    latest = {}
    for r in rows:
        latest[(r["provider"], *(r.get(k, "") for k in config_keys))] = r
    rows = list(latest.values())
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4))
    grouped_bars(a, rows, lambda r: float(r["median_s"]) * 1e3,
                 err=lambda r: (float(r["p20_s"]) * 1e3, float(r["p80_s"]) * 1e3),
                 ylabel="wall time, ms (median, p20–p80)")
    grouped_bars(b, rows, lambda r: max(float(r["peak_extra_bytes"]), 0) / 2**20, ylabel="peak extra memory, MiB")
    b.legend(**LEGEND)
    r0 = rows[-1]
    fig.suptitle(f"{title} | latest rows | {r0['cpu']}, {r0['threads']} threads, torch {r0['torch']} | "
                 f"{r0['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / fname, dpi=110)
    plt.close(fig)
    return [out / fname]


def last_run(rows: list) -> list:
    """The rows of the last run of a CSV with a ``run`` column (rows without one are older runs)."""
    runs = [r.get("run") for r in rows if r.get("run")]
    return [r for r in rows if r.get("run") == runs[-1]] if runs else []


def plot_var_loss(csv_path: Path, out: Path) -> list:
    """var_loss.png from the last run of bench_var_loss.py in ``csv_path``: the same rows, and the
    same ratios, as the table that run printed."""
    rows = last_run(read_rows(csv_path))
    if not rows:
        return []
    r0 = rows[0]
    names = [r["provider"] for r in rows]
    med = [float(r["median_s"]) * 1e3 for r in rows]
    err = [[m - float(r["p20_s"]) * 1e3 for m, r in zip(med, rows)],
           [float(r["p80_s"]) * 1e3 - m for m, r in zip(med, rows)]]
    colours = {"naive": "#7f7f7f", "fused": "#1f77b4", "fused_inplace": "#08306b", "fused_torch": "#aec7e8"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    a.bar(range(len(rows)), med, yerr=err, capsize=3, color=[colours.get(n) for n in names], edgecolor="black",
          linewidth=0.3)
    for i, r in enumerate(rows):
        label = f"{float(r['speedup_vs_naive']):.2f}× naive" if r.get("speedup_vs_naive") else ""
        if r.get("x_floor"):
            label += f"\n{float(r['x_floor']):.2f}× floor"
        a.annotate(label, (i, med[i] + err[1][i]), ha="center", va="bottom", fontsize=7, xytext=(0, 3),
                   textcoords="offset points")
    if r0.get("floor_s"):
        a.axhline(float(r0["floor_s"]) * 1e3, color="black", ls="--", lw=1,
                  label=f"floor {float(r0['floor_s']) * 1e3:.1f} ms (max + exp + scale sweeps)")
        a.legend(fontsize=8)
    a.set_xticks(range(len(rows)), names, fontsize=8)
    a.set_ylabel("forward + backward, ms (median, p20–p80)")
    a.set_ylim(0, max(m + e for m, e in zip(med, err[1])) * 1.2)
    a.grid(axis="y", alpha=0.3)
    mib = [max(float(r["peak_extra_bytes"]), 0) / 2**20 for r in rows]
    b.bar(range(len(rows)), mib, color=[colours.get(n) for n in names], edgecolor="black", linewidth=0.3)
    for i, r in enumerate(rows):
        b.annotate(f"{float(r['peak_extra_x_logits']):.2f}× logits", (i, mib[i]), ha="center", va="bottom",
                   fontsize=7)
    b.set_xticks(range(len(rows)), names, fontsize=8)
    b.set_ylabel("peak memory beyond the inputs, MiB")
    b.grid(axis="y", alpha=0.3)
    fig.suptitle(f"bench_var_loss.py run {r0['run']}: B={r0['B']} T={r0['T']} V={r0['V']} {r0['dtype']} on "
                 f"{r0['device']}, {r0['reps']} interleaved rounds | {r0['cpu']}, {r0['threads']} threads, "
                 f"load {r0.get('load_avg_1min', '-')} | torch {r0['torch']} | {r0['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [out]


def main(argv=None):
    p = arg_parser(__doc__)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--run", default=None, help="run id of peers.csv (default: the last one)")
    args = p.parse_args(argv)
    out = Path(args.results)
    written = []
    peers = read_rows(out / "peers.csv")
    if peers:
        run = args.run or peers[-1]["run"]
        written += plot_peers([r for r in peers if r["run"] == run], out)
    written += plot_var_loss(out / "var_loss.csv", out / "var_loss.png")
    written += plot_latest(read_rows(out / "fused_linear.csv"), out, "fused_linear.png",
                           "bench_fused_linear.py: fused-linear loss", ("B", "T", "H", "V", "dtype", "device"))
    written += plot_latest([r for r in read_rows(out / "cpu_backend.csv") if r["median_s"]], out, "cpu_backend.png",
                           "bench_cpu_backend.py: VAR loss on CPU", ("B", "T", "V", "dtype"))
    for w in written:
        print(f"wrote {w}")
    if not written:
        print(f"no CSV with rows under {out}")


if __name__ == "__main__":
    main()
