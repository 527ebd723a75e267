"""GPU figures estimated without a GPU, for the VAR loss (docs/design.md §4.2-4.3): the bytes of one forward +
backward counted in the interpreter and extrapolated in T, the kernels' launch specialisations for the AOT
compile, and the cost model's GPU assumed for each compile arch (its datasheet entry, or the rates a GPU suite
run measured). Used by benchmarks/gpu_measures.py, benchmarks/bench_peers.py (traffic part),
benchmarks/gpu_suite.py and tests/test_gpu_measures.py, tests/test_gpu_suite.py. Counting needs
``TRITON_INTERPRET=1`` set before triton is imported (the scripts set it). Nothing here is a measured GPU time.
"""

from __future__ import annotations

import torch

from tools import aot
from tools import costmodel as cm
from tools.naive import naive_var_loss
from tools.traffic import count_aten_traffic, count_triton_traffic
from varkernels import fused_var_loss
from varkernels.core import _triton_kernels
from varkernels.core.autograd import scale_triton_launch
from varkernels.core.token import token_triton_launch
from varkernels.var import _weights_kernel
from varkernels.var.weights import var_weights_triton_launch

GPUS = {"sm_80": cm.A100_SXM, "sm_90": cm.H100_SXM}  # the GPU assumed for each compile arch without a device
ARCH_OF = {cm.A100_SXM.name: "sm_80", cm.A100_PCIE.name: "sm_80", cm.H100_SXM.name: "sm_90",
           cm.H200_SXM.name: "sm_90"}  # the compile arch of each GPU of the cost model's table
COUNT_T = (2, 4)  # sequence lengths actually run in the interpreter


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
        gpu, _ = calibrated_gpu(calibration_rows, device_name)
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


def calibrated_gpu(rows, device_name: str):
    """(measured GPU, datasheet GPU) of the cost model from a run's calibration rows (measured: None without them)."""
    sheet = cm.gpu_for_device_name(device_name) or cm.H100_SXM
    rates = {r.get("rate_unit", "").split(" ")[0]: float(r["rate"]) for r in rows
             if r.get("part") == "calibrate" and r.get("status") == "ok" and r.get("rate")}
    if "FLOP/s" not in rates or "bytes/s" not in rates:
        return None, sheet
    return cm.measured_gpu(sheet, rates["FLOP/s"], rates["bytes/s"], name=f"{device_name} (measured)"), sheet
