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
for); with ``lse_in`` the token op skips its logsumexp sweep (backward of the log-prob mode). With an
``entropy`` output ([B·T] fp32, written; not with ``lse_in``) each chunk's token op also writes its rows'
entropy, in the same sweep (ignored rows: 0).

Registered as the operator ``varkernels::linear_token_pass`` (a ``torch.library.custom_op`` with a
fake implementation): under ``torch.compile`` the whole loop is one node of the graph, so its
chunk count and the row compaction never become graph breaks or shape guards. On tensors without
values (fake or meta: the driver run for its shapes, e.g. by the repository's tools/costmodel.py) there
is nothing to compact by: every row is processed and ignored rows get a zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op

from .._validation import data_checks_enabled
from . import linear_cpu
from .token import TokenOptions, token_kernel

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


def _accumulate_weight_grad(gw: torch.Tensor, g: torch.Tensor, h_c: torch.Tensor, backend: str) -> torch.Tensor:
    """gw += gᵀ·h_c; returns gw. Same dtypes (fp32 throughout, or a half-precision accumulator): one addmm.
    A bf16/fp16 chunk into the fp32 accumulator: on CUDA the tensor cores' GEMM with an fp32 output
    (``out_dtype``); on CPU with ``backend="cpu"`` the C++ extension's MKL GEMM with an fp32 output
    (linear_cpu.py); otherwise fp32 copies of the chunk (exact products, fp32 sums, fp32 GEMM speed)."""
    if g.dtype == gw.dtype:
        return gw.addmm_(g.t(), h_c)
    if gw.device.type == "cuda":
        return torch.addmm(gw, g.t(), h_c, out_dtype=torch.float32, out=gw)
    if backend == "cpu" and linear_cpu.f32_gemm_available():
        return linear_cpu.gemm_f32(g.t(), h_c, gw, 1.0, 1.0)
    return gw.addmm_(g.t().float(), h_c.float())


def linear_token_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    wants: tuple,
    opts: TokenOptions,
    entropy: Optional[torch.Tensor] = None,
):
    """One chunked pass. hidden [B, T, H]; weight [V, H]; bias [V] | None; labels [B·T];
    coef (the kernels' convention, see token.py), lse_in [B·T] fp32 | None; wants: (hidden, weight, bias)
    gradients asked for; opts: the call's :class:`TokenOptions`; entropy: [B·T] fp32 written (the token op's
    per-row entropy, 0 for ignored rows) or None.

    Returns (lp [B·T] fp32, lse [B·T] fp32, grad_hidden [B, T, H] | [0], grad_weight [V, H] fp32 | [0],
    grad_bias [V] fp32 | [0]); a gradient is an empty [0] tensor unless ``coef`` is given and it is wanted.
    """
    want_hidden, want_weight, want_bias = wants
    chunk_size, kernel = opts.chunk_size, token_kernel(opts.backend)
    B, T, H = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    has_grad = coef is not None
    lp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    if entropy is not None:
        entropy.zero_()  # rows compacted away (ignored) are 0
    gh = torch.zeros_like(hidden) if has_grad and want_hidden else hidden.new_empty(0)
    acc = torch.float32 if opts.accum_fp32 else weight.dtype
    gw = torch.zeros(V, H, dtype=acc, device=dev) if has_grad and want_weight else hidden.new_empty(0)
    gb = (torch.zeros(V, dtype=acc, device=dev)
          if has_grad and want_bias and bias is not None else hidden.new_empty(0))
    if data_checks_enabled(labels):  # prompt and padding rows cost nothing (one host sync for the count)
        idx = torch.nonzero(labels != opts.ignore_index).squeeze(1)
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
        ent_c = None if entropy is None else torch.empty(n, dtype=torch.float32, device=dev)
        lp_c, lse_c = kernel(
            x, take(labels).contiguous(), take(coef).contiguous() if has_grad else None,
            x if has_grad else None, take(lse_in).contiguous() if lse_in is not None else None, **opts.token_args(),
            entropy=ent_c,
        )
        put(lp, lp_c)
        put(lse, lse_c)
        if ent_c is not None:
            put(entropy, ent_c)
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
            gw = _accumulate_weight_grad(gw, g, h_c, opts.backend)
        if gb.numel():
            gb += g.sum(dim=0, dtype=torch.float32).to(gb.dtype)
        del logits_c, x, g  # free this chunk before the next one's GEMM: one chunk alive, not two
    return lp, lse, gh, gw, gb


@custom_op("varkernels::linear_token_pass", mutates_args={"entropy"})
def _linear_token_pass_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor] = None,
    *,
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
    """The driver as an operator. Call it with the options record flattened by keyword:
    ``torch.ops.varkernels.linear_token_pass(hidden, weight, bias, labels, coef, lse_in, want_hidden=...,
    want_weight=..., want_bias=..., **opts._asdict())``; coef in the kernels' convention (``kernel_coef``);
    ``entropy``: an optional [B·T] fp32 output (written), as the token op's (a positional argument: the schema
    allows no keyword-only tensors)."""
    opts = TokenOptions(backend=backend, softcap=softcap, inv_temperature=inv_temperature,
                        ignore_index=ignore_index, chunk_size=chunk_size, accum_fp32=accum_fp32)
    return linear_token_pass(hidden, weight, bias, labels, coef, lse_in, (want_hidden, want_weight, want_bias), opts,
                             entropy)


@_linear_token_pass_op.register_fake
def _(hidden, weight, bias, labels, coef, lse_in, entropy=None, *, want_hidden, want_weight, want_bias, accum_fp32,
      **_opts):
    B, T, H = hidden.shape
    V = weight.shape[0]
    f32 = torch.float32
    acc = f32 if accum_fp32 else weight.dtype
    has_grad = coef is not None
    gh = torch.empty_like(hidden) if has_grad and want_hidden else hidden.new_empty(0)
    gw = hidden.new_empty(V, H, dtype=acc) if has_grad and want_weight else hidden.new_empty(0)
    gb = hidden.new_empty(V, dtype=acc) if has_grad and want_bias and bias is not None else hidden.new_empty(0)
    return hidden.new_empty(B * T, dtype=f32), hidden.new_empty(B * T, dtype=f32), gh, gw, gb
