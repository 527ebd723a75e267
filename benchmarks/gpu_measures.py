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

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, append_csv, git_revision, machine_info, machine_line  # noqa: E402

from tools import aot  # noqa: E402
from tools import costmodel as cm  # noqa: E402
from tools.naive import naive_var_loss  # noqa: E402
from tools.traffic import count_aten_traffic, count_triton_traffic  # noqa: E402
from varkernels import fused_var_loss  # noqa: E402
from varkernels.core import _triton_kernels  # noqa: E402
from varkernels.core.autograd import scale_triton_launch  # noqa: E402
from varkernels.core.token import token_triton_launch  # noqa: E402
from varkernels.var import _weights_kernel  # noqa: E402
from varkernels.var.weights import var_weights_triton_launch  # noqa: E402

GPUS = {"sm_80": cm.A100_SXM, "sm_90": cm.H100_SXM}  # the GPU assumed for each compile arch without a device
ARCH_OF = {cm.A100_SXM.name: "sm_80", cm.A100_PCIE.name: "sm_80", cm.H100_SXM.name: "sm_90",
           cm.H200_SXM.name: "sm_90"}  # the compile arch of each GPU of the cost model's table
COUNT_T = (2, 4)  # sequence lengths actually run in the interpreter


def cuda_device_name():
    """The CUDA device's name, or None without one (nothing is run on it)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def calibration_of(rows, device_name=None) -> tuple:
    """(device name, calibration rows) of the last GPU suite run in ``rows`` (of ``device_name`` if given)
    that has an ok calibration."""
    runs = [r for r in rows if r.get("part") == "calibrate" and r.get("status") == "ok"
            and (device_name is None or r.get("gpu") == device_name)]
    if not runs:
        raise ValueError(f"calibration: expected a GPU suite CSV with ok 'calibrate' rows"
                         f"{f' of {device_name!r}' if device_name else ''}, got none")
    last = runs[-1]["run"]
    return runs[-1]["gpu"], [r for r in runs if r["run"] == last]


def assumed_gpus(device_name=None, calibration_rows=None) -> dict:
    """arch -> the cost model's GPU whose DRAM bandwidth costs that arch's roofline estimate: :data:`GPUS`, with
    the named device's datasheet entry (``gpu_for_device_name``) in its arch's place, at the rates measured on
    it when ``calibration_rows`` (a GPU suite run's 'calibrate' rows) are given, as the suite does."""
    gpus = dict(GPUS)
    if not device_name:
        if calibration_rows:
            raise ValueError("device_name: expected the name of the device the calibration rows were measured on, "
                             "got none")
        return gpus
    sheet = cm.gpu_for_device_name(device_name)
    if sheet is None:
        raise ValueError(f"device_name: expected a GPU of the cost model's table "
                         f"({', '.join(g.name for g in cm.GPUS.values())}), got {device_name!r}")
    gpu = sheet
    if calibration_rows:
        import gpu_suite

        gpu, _ = gpu_suite.calibrated_gpu(calibration_rows, device_name)
        if gpu is None:
            raise ValueError(f"calibration_rows: expected a measured GEMM rate and copy bandwidth of "
                             f"{device_name!r}, got {len(calibration_rows)} rows without both")
    gpus[ARCH_OF[sheet.name]] = gpu
    return gpus


def make_inputs(B, T, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)  # dense: every position is a target
    rewards = torch.randn(B, B, generator=g)
    ref_logps = -2 - torch.rand(B, B, generator=g)
    return logits, labels, rewards, ref_logps


def count_bytes(B, T, V, dtype) -> dict:
    """Bytes of one forward + backward, counted at this exact shape."""
    logits, labels, rewards, ref_logps = make_inputs(B, T, V, dtype)
    with count_triton_traffic() as kernels, count_aten_traffic() as glue:
        fused_var_loss(logits, labels, rewards, ref_logps, backend="triton").backward()
    logits.grad = None
    with count_aten_traffic() as naive:
        naive_var_loss(logits, labels, rewards, ref_logps).backward()
    return {"fused_kernel_bytes": kernels.total, "fused_glue_bytes": glue.total, "naive_bytes": naive.total}


def extrapolated_bytes(B, T, V, dtype) -> dict:
    """Counts at T = COUNT_T, extrapolated linearly in T to T."""
    (t1, t2) = COUNT_T
    c1, c2 = count_bytes(B, t1, V, dtype), count_bytes(B, t2, V, dtype)
    return {k: round(c1[k] + (c2[k] - c1[k]) / (t2 - t1) * (T - t1)) for k in c1}


def kernel_specs(B, T, V, dtype) -> dict:
    """The specialisations the launchers of the loss use at this shape (captured, nothing runs)."""
    N = B * T
    x = torch.empty(B, T, V, dtype=dtype, device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    r = torch.empty(1, B, B, **f32)
    core_kernels = ("_token_kernel", "_token_kernel_single", "_scale_kernel")
    with aot.capture_launches(_triton_kernels, *core_kernels) as ls, \
            aot.capture_launches(_weights_kernel, "_var_weights_kernel") as lw:
        var_weights_triton_launch(r, torch.empty_like(r), 1.0, True)
        token_triton_launch(x, torch.empty(N, dtype=torch.int64, device="meta"), torch.empty(N, **f32),
                            torch.empty_like(x), None, None, 1.0, -100)
        scale_triton_launch(torch.empty_like(x), torch.empty((), **f32))
    ls = [*lw, *ls]
    names = {"_var_weights_kernel": "weights", "_token_kernel": "token", "_token_kernel_single": "token",
             "_scale_kernel": "scale"}
    return {names[launch.name]: aot.launch_spec(launch.kernel, launch.kwargs) for launch in ls}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
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
