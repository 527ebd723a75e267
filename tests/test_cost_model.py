"""The GPU cost model (tools.costmodel): what its tracer records of the CUDA path on fake
tensors, the roofline arithmetic, and the peak-memory tracking. Small shapes: fast, no GPU."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tools import costmodel as cm

IGNORE = -100


def _fused_linear_trace(B=2, T=64, H=128, V=1024, chunk=32):
    with FakeTensorMode():
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        hidden = torch.empty(B, T, H, **bf16)
        weight = torch.empty(V, H, **bf16)
        labels = torch.zeros(B * T, dtype=torch.long, device="cuda")
        coef = torch.empty(B * T, device="cuda")
        return cm.varkernels_linear(hidden, weight, labels, coef, chunk_size=chunk)


def test_fused_linear_gemms_are_bf16_with_an_fp32_weight_gradient():
    """The bf16 CUDA path issues its three GEMMs per chunk on bf16 operands; the weight-gradient GEMM writes
    an fp32 output; no GEMM reads fp32 operands along the vocabulary dimension."""
    B, T, H, V, chunk = 2, 64, 128, 1024, 32
    tr = _fused_linear_trace(B, T, H, V, chunk)
    gemms = tr.gemms()
    n_chunks = B * T // chunk
    assert len(gemms) == 3 * n_chunks, [g.name for g in gemms]
    for g in gemms:
        operands = g.in_dtypes[-2:]
        assert operands == (torch.bfloat16, torch.bfloat16), (g.name, g.in_dtypes)
        assert g.flop_class == "bf16"
    weight_grads = [g for g in gemms if g.out_dtypes == (torch.float32,)]
    assert len(weight_grads) == n_chunks and all(g.name == "aten.addmm" for g in weight_grads)
    assert all(g.note == "out=acc on CUDA" for g in weight_grads)
    # each chunk: 2·chunk·V·H FLOPs per GEMM
    assert tr.flops == pytest.approx(3 * 2 * B * T * V * H)
    assert "varkernels.token_triton" in {r.name for r in tr.ops if r.how == "kernel"}


def test_token_kernel_follows_the_launchers_choice():
    """V = 1000 fits on chip: the launcher (token_kernel_config) takes the single-pass kernel, one read."""
    B, T, V = 2, 8, 1000
    with FakeTensorMode():
        logits = torch.empty(B, T, V, device="cuda", dtype=torch.bfloat16)
        labels = torch.zeros(B * T, dtype=torch.long, device="cuda")
        tr = cm.varkernels_logits(logits, labels, torch.empty(B * T, device="cuda"))
    (k,) = [r for r in tr.ops if r.name == "varkernels.token_triton"]
    N = B * T
    assert k.reads == N * V * 2 + N * 8 + N * 4 and k.note.startswith("1 read"), k


def test_token_kernel_declares_two_reads_and_one_write():
    B, T, V = 2, 8, 40000  # above the single-pass kernel's 32768: the tiled two-sweep kernel
    with FakeTensorMode():
        logits = torch.empty(B, T, V, device="cuda", dtype=torch.bfloat16)
        labels = torch.zeros(B * T, dtype=torch.long, device="cuda")
        tr = cm.varkernels_logits(logits, labels, torch.empty(B * T, device="cuda"))
    (k,) = [r for r in tr.ops if r.name == "varkernels.token_triton"]
    N = B * T
    assert k.reads == 2 * N * V * 2 + N * 8 + N * 4  # logits twice, int64 labels, fp32 coef
    assert k.writes == N * V * 2 + 2 * N * 4  # gradient, lp and lse
    single = cm.Assumptions(token_single_pass_max_v=V)
    reads, writes, _ = cm.KERNEL_TRAFFIC["varkernels.token_triton"](
        (logits, labels, None, logits, None), {}, single)
    assert reads == N * V * 2 + N * 8 and writes == N * V * 2 + 2 * N * 4


def test_roofline_of_a_known_gemm_matches_hand_arithmetic():
    m, n, k = 4096, 128256, 4096
    rec = cm.gemm_record(m, n, k, torch.bfloat16, torch.bfloat16)
    flops = 2 * m * n * k
    nbytes = (m * k + k * n + m * n) * 2
    assert rec.flops == flops and rec.nbytes == nbytes
    assert rec.seconds(cm.H100_SXM) == pytest.approx(flops / 989e12)  # compute-bound
    # the same GEMM on fp32 operands runs at the fp32 rate (TF32 off) or the TF32 rate when assumed
    f32 = cm.gemm_record(m, n, k, torch.float32, torch.float32)
    assert f32.seconds(cm.H100_SXM) == pytest.approx(flops / 67e12)
    tf32 = cm.gemm_record(m, n, k, torch.float32, torch.float32, tf32=True)
    assert tf32.seconds(cm.A100_SXM) == pytest.approx(flops / 156e12)
    # a bandwidth-bound op: bytes / DRAM bandwidth
    copy = cm.OpRecord("copy", "counted", reads=10**9, writes=10**9)
    assert copy.seconds(cm.A100_SXM) == pytest.approx(2e9 / 2.0e12)


def test_traced_mm_flops_and_bytes_match_hand_arithmetic():
    with FakeTensorMode():
        a = torch.empty(64, 32, device="cuda", dtype=torch.bfloat16)
        b = torch.empty(32, 16, device="cuda", dtype=torch.bfloat16)
        tr = cm.trace_call(lambda: a @ b)
    (rec,) = tr.ops
    assert rec.flops == 2 * 64 * 32 * 16
    assert rec.reads == (64 * 32 + 32 * 16) * 2 and rec.writes == 64 * 16 * 2
    assert tr.peak_bytes == 64 * 16 * 2


def test_peak_tracking_sees_the_fp32_accumulator():
    B, T, H, V, chunk = 2, 64, 128, 1024, 32
    tr = _fused_linear_trace(B, T, H, V, chunk)
    sizes = [(shape, dtype) for _, shape, dtype in tr.at_peak]
    assert ((V, H), torch.float32) in sizes
    # returned: grad_hidden and the bf16 weight gradient; the fp32 accumulator is extra
    assert tr.returned_bytes == B * T * H * 2 + V * H * 2
    assert tr.peak_extra_bytes >= V * H * 4


def test_freed_temporaries_leave_the_live_set():
    with FakeTensorMode():
        x = torch.empty(1000, device="cuda")

        def run():
            for _ in range(3):
                y = x * 2  # 4000 bytes each, the previous one freed on reassignment
                del y
            return (x + 1,)

        tr = cm.trace_call(run, returned=lambda r: list(r))
    assert tr.peak_bytes == 4000  # never two of them alive at once
    assert tr.returned_bytes == 4000 and tr.peak_extra_bytes == 0
