"""The C++ backend's half-precision extras of the fused-linear form (``backend="cpu"`` only).

PyTorch's CPU GEMMs have no fp32 output for bf16/fp16 operands (``addmm(..., out_dtype=)`` is CUDA-only),
so the fp32 weight gradient of a half-precision head would need fp32 copies of every logits chunk. The C++
extension (csrc/var_cpu_gemm.cpp) exposes MKL's half-precision GEMM with an fp32 output as the operator
``varkernels::gemm_f32`` (c = α·a·b + β·c); on it this module builds:

* :func:`gemm_f32`: the weight-gradient GEMM of the chunked driver (core/linear.py), without copies;
* the **deferred weight gradient** of the forward mode (:func:`forward_pass`, :func:`finish_weight_grad`):
  no fp32 [V, H] accumulator at all when the n non-ignored rows number at most 2·H (docs/design.md §3.3).

Nothing here changes process-wide state. Other backends, and PyTorch builds without MKL (``gemm_f32``
unavailable), take the chunked driver with fp32 copies. ``VARKERNELS_MKL_GEMM=0`` switches ``gemm_f32``
off (e.g. to compare the two paths on a CPU whose MKL bf16 kernels are not the fast ones).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from .. import csrc_loader
from .._validation import data_checks_enabled
from .token import TokenOptions, token_kernel

_F32_GEMM: dict = {}  # the answer of f32_gemm_available, asked once per process


def f32_gemm_available() -> bool:
    """True when ``torch.ops.varkernels.gemm_f32`` runs: the C++ extension is loaded and this PyTorch build
    links MKL's half-precision GEMMs with an fp32 output (x86-64 wheels do), unless ``VARKERNELS_MKL_GEMM=0``."""
    if "f32_gemm" not in _F32_GEMM:
        off = os.environ.get("VARKERNELS_MKL_GEMM", "1") in ("0", "false", "False", "off")
        mod = None if off else csrc_loader.load_extension(required=False)
        _F32_GEMM["f32_gemm"] = bool(mod is not None and getattr(mod, "has_f32_gemm", lambda: False)())
    return _F32_GEMM["f32_gemm"]


def gemm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """out (fp32) = alpha · a @ b + beta · out for bf16 or fp16 a, b of one dtype (needs :func:`f32_gemm_available`)."""
    torch.ops.varkernels.gemm_f32(a, b, out, alpha, beta)
    return out


class DeferredWeightGrad(NamedTuple):
    """What :func:`finish_weight_grad` needs. The logits gradient of the n non-ignored rows, transposed, gᵀ [V, n],
    is held in two parts: its first n₁ = min(n, H) columns in ``storage`` [V, H] (the weight's dtype; its first
    V·n₁ elements, as a [V, n₁] matrix), which becomes grad_weight, and the other n − n₁ ≤ H columns in
    ``extra`` [V, n − n₁] (empty when n ≤ H). ``h_rows`` [n, H]: the hidden rows they belong to."""

    storage: torch.Tensor
    extra: torch.Tensor
    h_rows: torch.Tensor


def forward_pass_applies(hidden: torch.Tensor, weight: torch.Tensor, wants: tuple, opts: TokenOptions) -> bool:
    """Whether :func:`forward_pass` may run for a forward-mode call (its row-count condition is checked inside):
    the C++ backend with ``gemm_f32``, a bf16/fp16 head whose weight gradient is wanted in the fp32 accumulator's
    precision, in eager mode."""
    return (
        opts.backend == "cpu"
        and wants[1]
        and opts.accum_fp32
        and weight.dtype in (torch.bfloat16, torch.float16)
        and hidden.dtype == weight.dtype
        and not torch.compiler.is_compiling()
        and data_checks_enabled(hidden)
        and f32_gemm_available()
    )


def _stored_parts(storage: torch.Tensor, extra: torch.Tensor, n: int) -> tuple:
    """(gᵀ's first n₁ columns as a [V, n₁] view of ``storage``, the rest: ``extra``)."""
    V, H = storage.shape
    n1 = min(n, H)
    return storage.view(-1)[: V * n1].view(V, n1), extra


def forward_pass(hidden, weight, bias, labels, coef, wants, opts: TokenOptions, entropy=None):
    """Forward mode of the fused-linear form with a bf16/fp16 weight, without a [V, H] fp32 accumulator.

    The chunked driver (core/linear.py) keeps grad_weight in an fp32 [V, H] accumulator from the forward to the
    backward, V·H·2 bytes more than the gradient itself, and the two coexist at the final cast. When the n
    non-ignored rows number at most 2·H, the logits gradient of all of them, g [n, V], needs no more than that:
    it is kept transposed, its first min(n, H) columns in the very storage that becomes grad_weight
    (:class:`DeferredWeightGrad`), the rest (n − H ≤ H columns) beside it. The backward
    (:func:`finish_weight_grad`) then computes grad_weight = s·gᵀ·h in place once the upstream scale s is known:
    GEMMs over all n rows with fp32 sums, scaled and rounded once, as the accumulator path does. Extra memory:
    V·max(n − H, 0)·2 bytes, one [chunk, V] logits block and the gathered rows h [n, H], never more than the
    accumulator's; no GEMM reads or writes a [V, H] accumulator per chunk.

    Arguments as the driver's (``coef`` given, in the kernels' convention; ``entropy``: [B·T] fp32 written, or
    None; left untouched when None is returned). Returns None when n = 0 or n > 2·H
    (the caller then runs the chunked driver), else (lp [B·T] fp32, lse [B·T] fp32, grad_hidden [B, T, H] | [0],
    grad_bias [V] fp32 | [0], :class:`DeferredWeightGrad`); grad_hidden and grad_bias chunk by chunk.
    """
    want_hidden, _, want_bias = wants
    B, T, H = hidden.shape
    V = weight.shape[0]
    idx = torch.nonzero(labels != opts.ignore_index).squeeze(1)
    n = idx.numel()
    if n == 0 or n > 2 * H:
        return None
    dev, f32 = hidden.device, torch.float32
    n1 = min(n, H)
    storage = torch.empty(V, H, dtype=weight.dtype, device=dev)  # becomes grad_weight
    extra = torch.empty(V, n - n1, dtype=weight.dtype, device=dev)
    parts = _stored_parts(storage, extra, n)
    b_i, t_i = idx // T, idx % T
    h_rows = hidden[b_i, t_i]  # [n, H]: the rows the backward multiplies by
    lab, cf = labels[idx].contiguous(), coef[idx].contiguous()
    lp = torch.zeros(B * T, dtype=f32, device=dev)
    lse = torch.zeros(B * T, dtype=f32, device=dev)
    gh = torch.zeros_like(hidden) if want_hidden else hidden.new_empty(0)
    gb = torch.zeros(V, dtype=f32, device=dev) if want_bias and bias is not None else hidden.new_empty(0)
    if entropy is not None:
        entropy.zero_()  # ignored rows
    chunk = min(opts.chunk_size, n)
    block = torch.empty(chunk, V, dtype=weight.dtype, device=dev)  # one logits block, reused
    w_t = weight.t()
    kernel = token_kernel(opts.backend)
    for c0 in range(0, n, chunk):
        m = min(n, c0 + chunk) - c0
        rows = slice(c0, c0 + m)
        x = block[:m]
        if bias is not None:
            torch.addmm(bias, h_rows[rows], w_t, out=x)
        else:
            torch.mm(h_rows[rows], w_t, out=x)
        x3 = x.unsqueeze(0)
        ent_c = None if entropy is None else torch.empty(m, dtype=f32, device=dev)
        lp_c, lse_c = kernel(x3, lab[rows], cf[rows], x3, None, **opts.token_args(), entropy=ent_c)
        lp[idx[rows]] = lp_c  # x now holds the gradient w.r.t. these logits
        lse[idx[rows]] = lse_c
        if ent_c is not None:
            entropy[idx[rows]] = ent_c
        if gh.numel():
            gh[b_i[rows], t_i[rows]] = x @ weight
        if gb.numel():
            gb += x.sum(dim=0, dtype=f32)
        k = max(0, min(m, n1 - c0))  # rows of this chunk whose columns live in the storage
        if k:
            parts[0][:, c0 : c0 + k].copy_(x[:k].t())
        if k < m:
            parts[1][:, c0 + k - n1 : c0 + m - n1].copy_(x[k:].t())
    return lp, lse, gh, gb, DeferredWeightGrad(storage, extra, h_rows)


# fp32 rows of the backward's output tile: 4 MiB (512 rows at H = 2048)
FINISH_TILE_BYTES = 4 * 2**20


def finish_weight_grad(deferred: DeferredWeightGrad, scale: torch.Tensor) -> torch.Tensor:
    """grad_weight [V, H] = scale·gᵀ·h in the weight's dtype, written over ``deferred.storage`` (and returned).

    Vocabulary tiles [v0, v1) go from the last to the first: the tile's fp32 product is computed from its rows
    of gᵀ (in the storage: elements v0·n₁ … v1·n₁, n₁ = min(n, H); and in ``extra``) before it is rounded into
    rows v0 … v1 of grad_weight (elements v0·H … v1·H). Since n₁ ≤ H, that write reaches only stored rows ≥ v0,
    which this tile and the tiles before it (higher v) have already read; rows < v0 lie below v0·n₁ ≤ v0·H and
    are untouched. ``scale`` (the upstream gradient, a 0-dim tensor) multiplies the fp32 product before the
    one rounding.
    """
    storage, extra, h_rows = deferred
    V, H = storage.shape
    n = h_rows.shape[0]
    g1, g2 = _stored_parts(storage, extra, n)
    n1 = g1.shape[1]
    h1, h2 = h_rows[:n1], h_rows[n1:]
    s = float(scale)
    rows = max(1, FINISH_TILE_BYTES // (4 * H))
    tile = torch.empty(min(rows, V), H, dtype=torch.float32, device=storage.device)
    for v1 in range(V, 0, -rows):
        v0 = max(0, v1 - rows)
        out = gemm_f32(g1[v0:v1], h1, tile[: v1 - v0], s, 0.0)
        if n > n1:
            out = gemm_f32(g2[v0:v1], h2, out, s, 1.0)
        storage[v0:v1].copy_(out)
    return storage
