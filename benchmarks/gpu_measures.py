"""What can be measured of the GPU path without a GPU (docs/design.md §4.2-4.3), for the VAR loss.

    python benchmarks/gpu_measures.py                          # V ∈ {32000, 128256}, bf16 and fp32
    python benchmarks/gpu_measures.py --V 256000 --dtypes float16
    python benchmarks/gpu_measures.py --device-name "NVIDIA H200"          # sm_90 costed as the H200
    python benchmarks/gpu_measures.py --calibration benchmarks/results/gpu_suite.csv  # at the suite's measured rates

For B=8, T=512 (forward + backward, upstream gradient 1, every token a target):

* bytes moved — Triton kernels counted in the interpreter (loads + stores of active lanes), plus
  the aten glue around them; naive eager (tools/naive.py) counted as bytes in + out of every
  aten op. Both are COUNTED at B=8, T=2 and T=4 and EXTRAPOLATED linearly in T to T=512: every
  count is affine in T (per-token work plus per-batch B×B work), so the extrapolation is exact
  for these programs (checked: T=2,4 → 16 equals a direct count at T=16, V=4099, fp32 and bf16);
  running the interpreter at T=512 would take many minutes for the same numbers.
* cubin resources of the kernels at their default launch (registers, shared memory, local
  memory = spills) for sm_80 and sm_90, compiled ahead of time, and an occupancy ESTIMATE.
* a roofline time ESTIMATE = bytes / peak DRAM bandwidth of the GPU assumed for each arch: the cost
  model's datasheet entries (tools/costmodel.py), A100 SXM 2.0 TB/s for sm_80 and
  H100 SXM 3.35 TB/s for sm_90, unless a device is named: ``--device-name`` (by default the CUDA
  device's name when one is present) puts its entry in its arch's place (an "NVIDIA H200" is sm_90
  too, at 4.8 TB/s), and ``--calibration`` a GPU suite CSV (benchmarks/gpu_suite.py) costs it at the
  rates its calibration step measured on that device (``measured_gpu``). It is a lower bound that
  ignores launch overhead, latency and the gap between achieved and peak bandwidth. Nothing here
  runs on a GPU; nothing here is a measured GPU time.

Rows are appended to benchmarks/results/gpu_measures.csv with the machine and versions.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU tensors
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, append_csv, arg_parser, git_revision, machine_info, machine_line  # noqa: E402

from tools import aot  # noqa: E402, F401  (tests reach the AOT module through this script)
from tools import costmodel as cm  # noqa: E402
from tools.gpu_estimates import (  # noqa: E402, F401  (GPUS, calibration_of: used by tests through this script)
    COUNT_T,
    GPUS,
    assumed_gpus,
    calibration_of,
    extrapolated_bytes,
    kernel_specs,
)


def cuda_device_name():
    """The CUDA device's name, or None without one (nothing is run on it)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def main(argv=None):
    p = arg_parser(__doc__, B=8, T=512)
    p.add_argument("--V", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--csv", default=str(RESULTS / "gpu_measures.csv"))
    p.add_argument("--device-name", default=None,
                   help="cost the roofline of this device's arch as this GPU (torch.cuda.get_device_name(), e.g. "
                        "'NVIDIA H200'); default: the CUDA device's name when one is present")
    p.add_argument("--calibration", default=None,
                   help="a GPU suite CSV: cost the device at the rates its last calibration step measured")
    args = p.parse_args(argv)
    B, T = args.B, args.T
    have_cuobjdump = aot.cuobjdump_path() is not None
    device_name, calibration_rows = args.device_name, None
    if args.calibration:
        import gpu_suite

        device_name, calibration_rows = calibration_of(gpu_suite.read_rows(Path(args.calibration)), device_name)
    elif device_name is None and (detected := cuda_device_name()) is not None:
        if cm.gpu_for_device_name(detected) is None:
            print(f"device {detected!r} is not in the cost model's table: datasheet defaults kept")
        else:
            device_name = detected
    gpus = assumed_gpus(device_name, calibration_rows)

    revision = git_revision()
    print(machine_line() + f" | varkernels {revision}")
    print(f"config: B={B} T={T}, fused_var_loss(backend='triton') forward+backward vs naive eager "
          f"(tools/naive.py), dense labels, upstream gradient 1")
    print(f"bytes: COUNTED at B={B}, T={COUNT_T[0]} and T={COUNT_T[1]} in the Triton interpreter / a "
          f"TorchDispatchMode, EXTRAPOLATED linearly in T to T={T}")
    print("times: ROOFLINE ESTIMATES = bytes / peak DRAM bandwidth "
          + ", ".join(f"{a} → {g.name} {g.dram_bytes_per_s / 1e12:.2f} TB/s" for a, g in gpus.items())
          + "; no GPU was used")
    if not have_cuobjdump:
        print("cuobjdump not found: cubin resources are left empty")

    cases = [(V, getattr(torch, d)) for V in args.V for d in args.dtypes]
    specs = {case: kernel_specs(B, T, *case) for case in cases}
    resources = {}
    if have_cuobjdump:
        resources = aot.compile_specs(list(dict.fromkeys(s for sp in specs.values() for s in sp.values())),
                                      archs=list(gpus), workers=2)

    rows = []
    header = (f"{'V':>7s} {'dtype':>9s} {'fused MB':>9s} {'naive MB':>9s} {'naive/fused':>11s} "
              f"{'fused/floor':>11s} {'arch':>6s} {'token regs/smem/spill':>21s} {'occ est':>7s} "
              f"{'scale regs/spill':>16s} {'est fused us':>12s} {'est naive us':>12s}")
    print(header)
    for V, dtype in cases:
        b = extrapolated_bytes(B, T, V, dtype)
        esize = torch.empty((), dtype=dtype).element_size()
        floor = 2 * B * T * V * esize  # docs/design.md §4.3 floor: one read of the logits, one write of the gradient
        fused = b["fused_kernel_bytes"] + b["fused_glue_bytes"]
        for arch, gpu in gpus.items():
            bandwidth = gpu.dram_bytes_per_s
            tok = resources.get((specs[(V, dtype)]["token"], arch), {})
            sca = resources.get((specs[(V, dtype)]["scale"], arch), {})
            wei = resources.get((specs[(V, dtype)]["weights"], arch), {})
            row = {
                **machine_info(), "git": revision, "B": B, "T": T, "V": V, "dtype": str(dtype).replace("torch.", ""),
                "bytes_method": f"counted at T={COUNT_T[0]},{COUNT_T[1]}; linear in T", **b,
                "fused_bytes": fused, "naive_over_fused": b["naive_bytes"] / fused,
                "floor_bytes": floor, "fused_over_floor": fused / floor,
                "arch": arch, "assumed_gpu": gpu.name, "assumed_bandwidth_Bps": bandwidth,
                "assumed_gpu_source": gpu.source,
                "token_num_warps": specs[(V, dtype)]["token"].num_warps,
                "token_block_v": dict(specs[(V, dtype)]["token"].constexprs)["BLOCK_V"],
                "token_regs": tok.get("regs"), "token_shared": tok.get("shared"),
                "token_dynamic_shared": tok.get("dynamic_shared"), "token_local": tok.get("local"),
                "token_est_occupancy": tok.get("est_occupancy"), "token_est_limiter": tok.get("est_limiter"),
                "scale_regs": sca.get("regs"), "scale_local": sca.get("local"),
                "weights_regs": wei.get("regs"), "weights_local": wei.get("local"),
                "est_fused_us": fused / bandwidth * 1e6, "est_naive_us": b["naive_bytes"] / bandwidth * 1e6,
                "est_note": "roofline ESTIMATE bytes/peak bandwidth, not measured",
            }
            rows.append(row)
            res = (f"{tok.get('regs')}/{(tok.get('shared') or 0) + (tok.get('dynamic_shared') or 0)}B/"
                   f"{tok.get('local')}B") if tok else "-"
            occ = f"{tok['est_occupancy']:.2f}" if tok else "-"
            scale_res = f"{sca.get('regs')}/{sca.get('local')}B" if sca else "-"
            print(f"{V:7d} {row['dtype']:>9s} {fused / 1e6:9.1f} {b['naive_bytes'] / 1e6:9.1f} "
                  f"{row['naive_over_fused']:10.2f}x {row['fused_over_floor']:10.3f}x {arch:>6s} {res:>21s} "
                  f"{occ:>7s} {scale_res:>16s} {row['est_fused_us']:12.0f} {row['est_naive_us']:12.0f}")
    append_csv(Path(args.csv), rows)
    print("floor = one read of the logits + one write of the gradient (docs/design.md §4.3); the fused loss reads "
          "the logits twice (two sweeps), so ~1.5x floor is its design point")
    print(f"rows appended to {args.csv}")


if __name__ == "__main__":
    main()
