"""The fused-linear driver: the token op on logits computed chunk by chunk from hidden states.

For the token rows of hidden [B, T, H] (the non-ignored ones only, in eager mode), in chunks of
``chunk_size`` rows::

    logits_c  = h_c · Wᵀ (+ b)                       # [chunk, V] in h's dtype
    g_c       = token op on logits_c, in place       # coef·(softmax − onehot)·dz/dx
    grad_h_c  = g_c · W                              # written to rows of grad_hidden
    grad_W   += g_cᵀ · h_c     (fp32 accumulator)    # fixed chunk order: deterministic
    grad_b   += Σ_rows g_c     (fp32)

The accumulators are fp32 by default (``accum_fp32=True``): the gradient is rounded once, to the
parameter's dtype, after the upstream scale. ``accum_fp32=False`` accumulates in the parameter's
dtype instead: V·H·2 bytes less for bf16/fp16 weights and, on a GPU, a GEMM whose epilogue reads
and writes a half-precision [V, H] buffer per chunk instead of an fp32 one, at the price of one
rounding per chunk (README: its measured error).

Extra memory is O(chunk·V + V·H): one logits chunk plus the fp32 weight-gradient accumulator,
never [B, T, V]. The gradients are produced only when ``coef`` is given (and only those asked
for); with ``lse_in`` the token op skips its logsumexp sweep (backward of the log-prob mode).

Registered as the operator ``varkernels::linear_token_pass`` (a ``torch.library.custom_op`` with a
fake implementation): under ``torch.compile`` the whole loop is one node of the graph, so its
chunk count and the row compaction never become graph breaks or shape guards. On tensors without
values (fake or meta: the driver run for its shapes, e.g. by the repository's tools/costmodel.py) there
is nothing to compact by: every row is processed and ignored rows get a zero gradient.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch
from torch.library import custom_op

from .. import csrc_loader
from .._validation import data_checks_enabled
from .token import TokenOptions, kernel_coef, token_op

# Memory budget of one [chunk, V] logits block, counted in the logits' dtype. CPU: 32 MiB keeps the
# extra memory of the loss at ~0.2x naive's at B=4, T=512, V=32000 (benchmarks/bench_fused_linear.py)
# while a 262-row fp32 matmul still runs at full speed; in bf16 the same budget gives 524 rows, and each
# chunk's two GEMMs stream all of W once, so fewer chunks read W fewer times (bf16 GEMMs are fast enough
# on AMX / AVX512-BF16 CPUs for that read to show). CUDA: 256 MiB, so the three matmuls stay large
# enough for the tensor cores (e.g. 523 rows at V = 128256).
CHUNK_BUDGET_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
MIN_CHUNK_ROWS = 16


def default_chunk_size(vocab_size: int, device_type: str = "cpu", element_size: int = 4) -> int:
    """Rows per chunk from ``CHUNK_BUDGET_BYTES``, counted in the logits' own dtype: on CPU 262 rows at
    V = 32000 in fp32, 524 in bf16; on CUDA 523 rows at V = 128256 in fp32, 1046 in bf16 (fewer, larger
    GEMMs: each chunk's weight-gradient GEMM reads and writes the whole [V, H] accumulator, and each
    chunk reads all of W, so the chunk count sets that traffic)."""
    budget = CHUNK_BUDGET_BYTES.get(device_type, CHUNK_BUDGET_BYTES["cpu"])
    per_row = element_size * vocab_size
    return max(MIN_CHUNK_ROWS, budget // per_row)


def _accumulate_weight_grad(
    gw: torch.Tensor, g: torch.Tensor, h_c: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """gw (fp32) += gᵀ·h_c; returns gw. fp32 inputs: one addmm. bf16/fp16 on CUDA: the GEMM runs on
    the tensor cores with an fp32 output (``out_dtype``), never on fp32 copies. On CPU with
    ``backend="cpu"``: the C++ extension's ``gemm_f32`` (MKL's bf16/fp16 GEMM with an fp32 output,
    :func:`f32_gemm_available`), again without copies. Otherwise (``backend="torch"``, or a PyTorch
    build without MKL) the chunks are upcast, and for bf16 the fp32 GEMM runs in oneDNN's bf16 math
    mode (``_bf16_math``): the copies hold bf16 values exactly, so its bf16 products are exact and its
    sums fp32 — the result of the fp32 GEMM at the bf16 kernels' speed."""
    if g.dtype == gw.dtype:  # fp32 throughout, or a half-precision accumulator (accum_fp32=False)
        return gw.addmm_(g.t(), h_c)
    if gw.device.type == "cuda":
        return torch.addmm(gw, g.t(), h_c, out_dtype=torch.float32, out=gw)
    return _gemm_f32(g.t(), h_c, gw, 1.0, 1.0, backend)


def f32_gemm_available() -> bool:
    """True when ``torch.ops.varkernels.gemm_f32`` runs: the C++ extension is loaded and this PyTorch build
    links MKL's half-precision GEMMs with an fp32 output (x86-64 wheels do; csrc/var_cpu_gemm.cpp), unless
    ``VARKERNELS_MKL_GEMM=0`` is set (then the fp32-copy path, e.g. to compare the two on a CPU where MKL's
    bf16 kernels are not the fast ones: measured only on an Intel Xeon with AMX, docs/benchmarks.md)."""
    if "f32_gemm" not in _F32_GEMM:
        off = os.environ.get("VARKERNELS_MKL_GEMM", "1") in ("0", "false", "False", "off")
        mod = None if off else csrc_loader.load_extension(required=False)
        _F32_GEMM["f32_gemm"] = bool(mod is not None and getattr(mod, "has_f32_gemm", lambda: False)())
    return _F32_GEMM["f32_gemm"]


_F32_GEMM: dict = {}  # the answer of f32_gemm_available, asked once per process


def _gemm_f32(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float, beta: float, backend: str
) -> torch.Tensor:
    """out (fp32) = alpha · a @ b + beta · out (beta 0 or 1) for half-precision a, b: ``gemm_f32`` with
    ``backend="cpu"`` when it runs, else fp32 copies (both bf16: in oneDNN's bf16 math mode, exact as in
    :func:`_accumulate_weight_grad`)."""
    if backend == "cpu" and a.dtype == b.dtype and f32_gemm_available():
        torch.ops.varkernels.gemm_f32(a, b, out, alpha, beta)
        return out
    both_bf16 = a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16
    with _bf16_math() if both_bf16 else contextlib.nullcontext():
        if beta == 0.0:
            torch.mm(a.float(), b.float(), out=out)
            return out.mul_(alpha) if alpha != 1.0 else out
        return out.addmm_(a.float(), b.float(), alpha=alpha)


class _bf16_math:
    """oneDNN's bf16 math mode for fp32 CPU matmuls, for the duration of one call (the previous mode is
    restored on exit). Used only on fp32 copies of bf16 tensors, where it changes no product. The mode is
    a process-wide flag: another thread's fp32 CPU matmul issued during the call would run in it too."""

    def __enter__(self):
        self.flags = getattr(torch.backends.mkldnn, "matmul", None)
        self.old = getattr(self.flags, "fp32_precision", None)
        if self.old is not None:
            self.flags.fp32_precision = "bf16"

    def __exit__(self, *exc):
        if self.old is not None:
            self.flags.fp32_precision = self.old


def linear_token_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    wants: tuple,
    opts: TokenOptions,
):
    """One chunked pass. hidden [B, T, H]; weight [V, H]; bias [V] | None; labels [B·T];
    coef (the kernels' convention, see token.py), lse_in [B·T] fp32 | None; wants: (hidden, weight, bias)
    gradients asked for; opts: the call's :class:`TokenOptions`.

    Returns (lp [B·T] fp32, lse [B·T] fp32, grad_hidden [B, T, H] | [0], grad_weight [V, H] fp32 | [0],
    grad_bias [V] fp32 | [0]); a gradient is an empty [0] tensor unless ``coef`` is given and it is wanted.
    """
    want_hidden, want_weight, want_bias = wants
    backend, softcap, inv_temperature, ignore_index, chunk_size, accum_fp32 = opts
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    has_grad = coef is not None
    lp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    gh = torch.zeros_like(hidden) if has_grad and want_hidden else hidden.new_empty(0)
    acc = torch.float32 if accum_fp32 else weight.dtype
    gw = torch.zeros(V, H, dtype=acc, device=dev) if has_grad and want_weight else hidden.new_empty(0)
    gb = (torch.zeros(V, dtype=acc, device=dev)
          if has_grad and want_bias and bias is not None else hidden.new_empty(0))
    if data_checks_enabled(labels):  # prompt and padding rows cost nothing (one host sync for the count)
        idx = torch.nonzero(labels != ignore_index).squeeze(1)
        n_rows = idx.numel()
    else:  # fake or meta labels, no values to compact by: every row, in slices of the flattened rows
        idx, n_rows = None, N  # (ignored rows get a zero gradient; hidden is copied only if it cannot be viewed)
        h_flat = hidden.reshape(N, H)
        gh_flat = gh.view(N, H) if gh.numel() else gh
    w_t = weight.t()
    for c0 in range(0, n_rows, chunk_size):
        n = min(n_rows, c0 + chunk_size) - c0
        if idx is not None:
            i_c = idx[c0 : c0 + n]
            b_c, t_c = i_c // T, i_c % T

            def take(t):
                return t[i_c]

            def put(t, v):
                t[i_c] = v

            h_c = hidden[b_c, t_c]  # [n, H] gathered rows, no copy of the whole hidden
        else:

            def take(t):
                return t[c0 : c0 + n]

            def put(t, v):
                t[c0 : c0 + n] = v

            h_c = take(h_flat)
        logits_c = torch.addmm(bias, h_c, w_t) if bias is not None else h_c @ w_t
        x = logits_c.unsqueeze(0)
        lp_c, lse_c = token_op(
            backend, x, take(labels).contiguous(), take(coef).contiguous() if has_grad else None,
            x if has_grad else None, take(lse_in).contiguous() if lse_in is not None else None,
            softcap=softcap, inv_temperature=inv_temperature, ignore_index=ignore_index,
        )
        put(lp, lp_c)
        put(lse, lse_c)
        if not has_grad:
            del logits_c, x
            continue
        g = logits_c  # now holds the gradient w.r.t. the logits chunk
        if gh.numel():
            if idx is not None:
                gh[b_c, t_c] = g @ weight
            else:
                put(gh_flat, g @ weight)
        if gw.numel():
            gw = _accumulate_weight_grad(gw, g, h_c, backend)
        if gb.numel():
            gb += g.sum(dim=0, dtype=torch.float32).to(gb.dtype)
        del logits_c, x, g  # free this chunk before the next one's GEMM: one chunk alive, not two
    return lp, lse, gh, gw, gb


# ------------------------------------------------------------------------ the weight gradient in its own storage


class DeferredWeightGrad(NamedTuple):
    """What :func:`finish_weight_grad` needs. The logits gradient of the n non-ignored rows, transposed, gᵀ [V, n],
    is held in two parts: its first n₁ = min(n, H) columns in ``storage`` [V, H] (the weight's dtype; its first
    V·n₁ elements, as a [V, n₁] matrix), which becomes grad_weight, and the other n − n₁ ≤ H columns in
    ``extra`` [V, n − n₁] (empty when n ≤ H). ``h_rows`` [n, H]: the hidden rows they belong to."""

    storage: torch.Tensor
    extra: torch.Tensor
    h_rows: torch.Tensor


def deferred_weight_grad_applies(hidden, weight, coef, wants, opts) -> bool:
    """Whether :func:`linear_token_pass_deferred` may run (its row-count condition is checked inside):
    forward mode on CPU, a half-precision weight gradient with the fp32 accumulator, eager mode."""
    return (
        coef is not None
        and wants[1]
        and opts.accum_fp32
        and hidden.device.type == "cpu"
        and weight.dtype in (torch.bfloat16, torch.float16)
        and hidden.dtype == weight.dtype
        and opts.backend in ("cpu", "torch")
        and data_checks_enabled(hidden)
        and not torch.compiler.is_compiling()
    )


def _stored_parts(storage: torch.Tensor, extra: torch.Tensor, n: int) -> tuple:
    """(gᵀ's first n₁ columns as a [V, n₁] view of ``storage``, the rest: ``extra``)."""
    V, H = storage.shape
    n1 = min(n, H)
    return storage.view(-1)[: V * n1].view(V, n1), extra


def linear_token_pass_deferred(hidden, weight, bias, labels, coef, wants, opts):
    """Forward mode of the fused-linear form on CPU with a bf16/fp16 weight, without a [V, H] fp32 accumulator.

    The chunked pass (:func:`linear_token_pass`) keeps grad_weight in an fp32 [V, H] accumulator from the
    forward to the backward, V·H·2 bytes more than the gradient itself, and the two coexist at the final cast.
    When the n non-ignored rows number at most 2·H, the logits gradient of all of them, g [n, V], needs no more
    than that: it is kept transposed, its first min(n, H) columns in the very storage that becomes grad_weight
    (:class:`DeferredWeightGrad`), the rest (n − H ≤ H columns) beside it. The backward
    (:func:`finish_weight_grad`) then computes grad_weight = s·gᵀ·h in place once the upstream scale s is
    known: GEMMs over all n rows with fp32 sums, scaled and rounded once, as the accumulator path does.
    Extra memory: V·max(n − H, 0)·2 bytes, one [chunk, V] logits block and the gathered rows h [n, H], never
    more than the accumulator's; no GEMM reads or writes a [V, H] accumulator per chunk.

    Same arguments as :func:`linear_token_pass` (``coef`` given). Returns None when n = 0 or n > 2·H (the caller
    then runs the chunked pass), else (lp [B·T] fp32, lse [B·T] fp32, grad_hidden [B, T, H] | [0],
    grad_bias [V] fp32 | [0], :class:`DeferredWeightGrad`). grad_hidden and grad_bias are computed chunk by
    chunk as in the chunked pass.
    """
    want_hidden, _, want_bias = wants
    backend, softcap, inv_temperature, ignore_index, chunk_size, _ = opts
    B, T, H = hidden.shape
    V = weight.shape[0]
    idx = torch.nonzero(labels != ignore_index).squeeze(1)
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
    chunk = min(chunk_size, n)
    block = torch.empty(chunk, V, dtype=weight.dtype, device=dev)  # one logits block, reused
    w_t = weight.t()
    for c0 in range(0, n, chunk):
        m = min(n, c0 + chunk) - c0
        rows = slice(c0, c0 + m)
        x = block[:m]
        if bias is not None:
            torch.addmm(bias, h_rows[rows], w_t, out=x)
        else:
            torch.mm(h_rows[rows], w_t, out=x)
        x3 = x.unsqueeze(0)
        lp_c, lse_c = token_op(backend, x3, lab[rows], cf[rows], x3, None, softcap=softcap,
                               inv_temperature=inv_temperature, ignore_index=ignore_index)
        lp[idx[rows]] = lp_c  # x now holds the gradient w.r.t. these logits
        lse[idx[rows]] = lse_c
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


def finish_weight_grad(deferred: DeferredWeightGrad, scale: torch.Tensor, backend: str) -> torch.Tensor:
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
        out = _gemm_f32(g1[v0:v1], h1, tile[: v1 - v0], s, 0.0, backend)
        if n > n1:
            out = _gemm_f32(g2[v0:v1], h2, out, s, 1.0, backend)
        storage[v0:v1].copy_(out)
    return storage


@custom_op("varkernels::linear_token_pass", mutates_args=())
def _linear_token_pass_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    want_hidden: bool,
    want_weight: bool,
    want_bias: bool,
    backend: str,
    softcap: Optional[float],
    inv_temperature: float,
    ignore_index: int,
    chunk_size: int,
    accum_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    opts = TokenOptions(backend, softcap, inv_temperature, ignore_index, chunk_size, accum_fp32)
    return linear_token_pass(hidden, weight, bias, labels, coef, lse_in, (want_hidden, want_weight, want_bias), opts)


@_linear_token_pass_op.register_fake
def _(hidden, weight, bias, labels, coef, lse_in, want_hidden, want_weight, want_bias, *flat_opts):
    B, T, H = hidden.shape
    V = weight.shape[0]
    f32 = torch.float32
    acc = f32 if TokenOptions(*flat_opts).accum_fp32 else weight.dtype
    has_grad = coef is not None
    gh = torch.empty_like(hidden) if has_grad and want_hidden else hidden.new_empty(0)
    gw = hidden.new_empty(V, H, dtype=acc) if has_grad and want_weight else hidden.new_empty(0)
    gb = hidden.new_empty(V, dtype=acc) if has_grad and want_bias and bias is not None else hidden.new_empty(0)
    return hidden.new_empty(B * T, dtype=f32), hidden.new_empty(B * T, dtype=f32), gh, gw, gb


def run_linear_token(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    dlp: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    wants: tuple,
    opts: TokenOptions,
):
    """The registered operator with ``dlp`` = d value / d lp (or None: no gradient): the torch.library
    boundary of the fused-linear form, where ``opts`` is flattened and the sign fixed (``kernel_coef``)."""
    return torch.ops.varkernels.linear_token_pass(hidden, weight, bias, labels, kernel_coef(dlp), lse_in, *wants, *opts)
