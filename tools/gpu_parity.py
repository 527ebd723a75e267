"""Parity of the Triton paths against ``varkernels.reference`` on a device, with the tests' tolerance policy.

Used by the GPU suite (benchmarks/gpu_suite.py: its smoke and parity stages, on CUDA) and by
tests/test_gpu_suite.py (on the CPU, in the Triton interpreter). A case is ``(op, dtype name, shape dict, options
dict)``; ``parity_one`` raises AssertionError on a mismatch. The policy is tests/helpers.py's (2 × PyTorch's error
against a float64 truth + atol) plus the derived term for the GPU's approximate exp2 (docs/design.md §4.6).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")  # helpers.py, test_single_pass.py
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

def parity_cases() -> list:
    """[(op, dtype name, shape dict, options dict)] of the parity stage, in the order they run. The first is
    the weight-gradient GEMM's CUDA branch (``addmm(..., out_dtype=float32, out=gw)``), which no machine of
    this project could execute (fake tensors take its out-of-place branch)."""
    cases = [("weight_grad_gemm", "bfloat16", dict(N=1024, V=1001, H=256), {}),
             ("weight_grad_gemm", "float16", dict(N=1024, V=1001, H=256), {})]
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


def smoke_parity_cases() -> list:
    """One case per kernel: the weight-gradient GEMM, the single-pass and the tiled token kernel (VAR mode),
    the log-prob modes (forward without gradient, backward from the saved logsumexp), and the fused-linear
    driver (with the VAR-weights and scaling kernels)."""
    return [
        ("weight_grad_gemm", "bfloat16", dict(N=1024, V=1001, H=256), {}),
        ("fused_var_loss", "bfloat16", dict(B=4, T=33, V=1000), {}),
        ("fused_var_loss", "bfloat16", dict(B=2, T=9, V=128256), {}),
        ("sequence_logps", "bfloat16", dict(B=3, T=9, V=32003), dict(reduction="mean", softcap=5.0,
                                                                      shift_labels=True)),
        ("fused_linear_var_loss", "bfloat16", dict(B=2, T=64, H=256, V=32003), {}),
    ]


def case_label(op, dt, shape, opts) -> str:
    return f"{op} {dt} " + " ".join(f"{k}={v}" for k, v in {**shape, **opts}.items())


def parity_one(op, dt_name, shape, opts, device="cuda", exp2_rel_err=None) -> None:
    """One parity case on ``device`` (CUDA; "cpu" under TRITON_INTERPRET=1 for the suite's own tests); raises
    AssertionError on a mismatch.

    ``exp2_rel_err``: the relative error bound of the device's exp2 (default: ``helpers.EXP2_APPROX_REL_ERR``
    on CUDA, whose ``tl.exp2`` is ``ex2.approx.ftz.f32``; 0 on the CPU, whose interpreter exp2 is numpy's).
    It adds the derived term of docs/design.md §4.6 to the absolute floors; the rest of the policy is the
    tests' (2 × PyTorch's error against a float64 truth + atol)."""
    import torch
    from helpers import (
        EXP2_APPROX_REL_ERR,
        IGNORE_INDEX,
        assert_close,
        exp2_grad_atol,
        exp2_lp_atol,
        lp_atol,
        make_labels,
        make_logits,
        make_pairs,
        reference_run,
    )

    from varkernels import fused_linear_var_loss, fused_var_loss, sequence_logps
    from varkernels.reference import linear_var_loss_reference, sequence_logps_reference

    if exp2_rel_err is None:
        exp2_rel_err = EXP2_APPROX_REL_ERR if torch.device(device).type == "cuda" else 0.0
    d = exp2_rel_err
    nt = exp2_tiles(shape.get("V", 1), dt_name, opts.get("softcap"))

    def _to(*ts):  # the inputs are built on the CPU (seeded), then moved
        return [t.to(device) if t is not None else None for t in ts]

    dtype = getattr(torch, dt_name)
    g = torch.Generator().manual_seed(0)
    if op == "weight_grad_gemm":
        check_weight_grad_gemm(shape["N"], shape["V"], shape["H"], dtype, device)
    elif op == "fused_var_loss":
        opts = dict(opts)
        ignored = opts.pop("ignored_rows", ())
        B, T, V = shape["B"], shape["T"], shape["V"]
        labels = make_labels(B, T, V, ignored_rows=ignored, generator=g)
        logits = make_logits(B, T, V, dtype, labels=torch.where(labels == IGNORE_INDEX, 0, labels), generator=g)
        rewards, ref_logps = make_pairs(labels, logp_reduction=opts.get("logp_reduction", "mean"), generator=g)
        logits, labels, rewards, ref_logps = _to(logits.detach(), labels, rewards, ref_logps)
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
        a_loss, a_lp = truth.weights.double() * c_n / B, c_n.max()
        floors = {"loss": lp_atol(a_loss) + exp2_lp_atol(a_loss, d, nt),
                  "policy_logps": lp_atol(a_lp) + exp2_lp_atol(a_lp, d, nt)}
        for field in ("loss", "weights", "log_z", "policy_logps", "ess"):
            assert_close(getattr(out, field), getattr(ref, field), getattr(truth, field), name=field,
                         atol_floor=floors.get(field, 0.0))
        assert x.grad is not None and x.grad.dtype == dtype
        assert_close(x.grad, ref_g, truth_g, name="logits grad", atol_floor=exp2_grad_atol(truth_g, d, nt))
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
        per_row = float(T) if opts.get("reduction") == "sum" else 1.0  # Σ|a_k| of one output: n tokens or 1
        assert_close(out, same, truth, name="logps", atol_floor=exp2_lp_atol(torch.tensor(per_row), d, nt))
        assert_close(og, sg, tg, name="grad", atol_floor=exp2_grad_atol(tg, d, nt))
    elif op == "token_kernel":
        import test_single_pass as sp

        x, labels, coef = sp._inputs(shape["B"], shape["T"], shape["V"], dtype)
        x, labels, coef = _to(x, labels, coef)
        sp._check(x, labels, coef, mode=opts["mode"], kernel=opts["kernel"], softcap=opts.get("softcap"),
                  exp2_rel_err=d)
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
        h, W, b, y, R, Q = _to(h, W, b, y, R, Q)

        def run(fn, dt, **kw):
            ts = [t.detach().to(dt).clone().requires_grad_() for t in (h, W, b)]
            out = fn(ts[0], ts[1], y, R, Q, bias=ts[2], return_aux=True, **kw)
            out.loss.backward()
            return out, [t.grad for t in ts]

        truth, tg = run(linear_var_loss_reference, torch.float64, **opts)
        same, sg = run(linear_var_loss_reference, dtype, **opts)
        out, og = run(fused_linear_var_loss, dtype, backend="triton", **opts)
        a = {"loss": truth.weights.double() / B, "policy_logps": torch.ones(())}  # "mean" reduction: c_i = 1/n_i
        for field in ("loss", "policy_logps", "weights"):
            floor = exp2_lp_atol(a[field], d, nt) if field in a else 0.0
            assert_close(getattr(out, field), getattr(same, field), getattr(truth, field), name=field,
                         atol_floor=floor)
        for name, o, t, s in zip(("grad_hidden", "grad_weight", "grad_bias"), og, tg, sg):
            assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
            assert_close(o, s, t, name=name, atol_floor=exp2_grad_atol(t, d, nt))
    else:
        raise ValueError(op)


def exp2_tiles(V: int, dt_name: str, softcap=None) -> int:
    """BLOCK_V tiles per row of the token kernel the launcher picks for (V, dtype, softcap): 1 for the single-pass
    kernel; each tile of the tiled kernel rescales the running sum by one more exp2 (docs/design.md §4.6)."""
    import torch

    from varkernels.core._triton_kernels import token_kernel_config

    kernel, block, _ = token_kernel_config(V, getattr(torch, dt_name), softcap=softcap)
    return 1 if getattr(kernel, "fn", kernel).__name__.endswith("_single") else -(-V // block)


def check_weight_grad_gemm(N, V, H, dtype, device) -> str:
    """``varkernels.core.linear._accumulate_weight_grad(gw, g, h)``: gw (fp32) += gᵀ·h with half-precision g, h.
    On CUDA it must take its real branch, ``torch.addmm(gw, g.t(), h, out_dtype=torch.float32, out=gw)`` (a
    spy on torch.addmm checks the call), return gw itself (in place), and agree with the float64 truth within
    2 × the error of the fp32 GEMM of the same (exactly fp32-representable) operands. Returns the branch taken."""
    import torch
    from helpers import assert_close

    from varkernels.core.linear import _accumulate_weight_grad

    gen = torch.Generator().manual_seed(1)
    g = torch.randn(N, V, generator=gen).to(dtype).to(device)
    h = torch.randn(N, H, generator=gen).to(dtype).to(device)
    gw0 = torch.randn(V, H, generator=gen).to(device)
    gw = gw0.clone()
    calls = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_addmm(*args, **kwargs)

    torch.addmm = spy
    try:
        out = _accumulate_weight_grad(gw, g, h, "triton" if torch.device(device).type == "cuda" else "torch")
    finally:
        torch.addmm = real_addmm
    branch = "cpu: addmm_ of fp32 copies"
    if torch.device(device).type == "cuda":
        assert calls and calls[0].get("out") is gw and calls[0].get("out_dtype") == torch.float32, (
            f"_accumulate_weight_grad did not call addmm(..., out_dtype=float32, out=gw) on CUDA: {calls}")
        branch = "cuda: addmm(out_dtype=float32, out=gw)"
    assert out.data_ptr() == gw.data_ptr() and out.dtype == torch.float32, "the accumulator must be updated in place"
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the yardstick is a true fp32 GEMM
    try:
        ref = gw0 + g.float().t() @ h.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    truth = gw0.double() + g.double().t() @ h.double()
    assert_close(out, ref, truth, name=f"grad_weight accumulator ({branch})")
    return branch


def run_parity(cases, device="cuda", exp2_rel_err=None) -> bool:
    """Every case in turn; stops at the first mismatch (printed) and returns False; True if all agree."""
    print(f"\n== parity of the Triton paths on {device} against varkernels.reference ({len(cases)} cases)")
    t0 = time.perf_counter()
    for i, c in enumerate(cases, 1):
        try:
            parity_one(*c, device=device, exp2_rel_err=exp2_rel_err)
        except AssertionError as e:
            print(f"   [{i}/{len(cases)}] MISMATCH {case_label(*c)}\n{e}")
            print("   stopped: nothing is timed while a Triton path disagrees with the reference")
            return False
        print(f"   [{i}/{len(cases)}] ok {case_label(*c)}")
    print(f"   all {len(cases)} cases agree ({time.perf_counter() - t0:.0f} s)")
    return True
