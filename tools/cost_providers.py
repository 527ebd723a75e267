"""The providers of the GPU cost model: each one's loss and gradients at a shape, traced on fake CUDA tensors
with tools/costmodel.py or counted from its published algorithm; ``rows_for`` gives the rows of
benchmarks/results/cost_model.csv. Shared by benchmarks/cost_model.py (the table), benchmarks/gpu_suite.py (the
estimate beside each measured time) and tests/test_cost_model_calibration.py (the model against published
measurements). What is traced and what counted, and the weights' cases: benchmarks/cost_model.py's docstring and
docs/cost_model.md. Every time here is a roofline ESTIMATE, never a measurement.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from tools import costmodel as cm
from tools.naive import naive_linear_var_loss, naive_var_loss

HEADS = {"llama3-8b": (4096, 128256), "gemma2-2b": (2304, 256000)}
SHAPES = [("llama3-8b", 8192), ("llama3-8b", 16384), ("llama3-8b", 32768), ("gemma2-2b", 8192), ("gemma2-2b", 32768)]
B = 8  # sequences; T = tokens / B
BF16 = torch.bfloat16
F32 = torch.float32


@dataclasses.dataclass
class Case:
    head: str
    tokens: int
    master: bool  # fp32 master weight cast to bf16 first (autocast, as the trainer does)

    @property
    def H(self):
        return HEADS[self.head][0]

    @property
    def V(self):
        return HEADS[self.head][1]

    @property
    def T(self):
        return self.tokens // B

    @property
    def weights(self):
        return "fp32 master" if self.master else "bf16"


def _cuda(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


# ---------------------------------------------------------------------------------------- traced


def trace_varkernels_linear(c: Case) -> cm.Trace:
    from varkernels.core.linear import default_chunk_size

    tr = _trace_varkernels_linear(c)
    tr.method = f"traced (chunk {default_chunk_size(c.V, 'cuda', 2)} rows, fp32 accumulator)"
    return tr


def _trace_varkernels_linear(c: Case) -> cm.Trace:
    with FakeTensorMode():
        h = _cuda(B, c.T, c.H)
        labels = torch.zeros(c.tokens, dtype=torch.long, device="cuda")
        coef = _cuda(c.tokens, dtype=F32)
        if c.master:
            return cm.varkernels_linear(h, None, labels, coef, master_weight=_cuda(c.V, c.H, dtype=F32))
        return cm.varkernels_linear(h, _cuda(c.V, c.H), labels, coef)


def trace_varkernels_linear_param_accum(c: Case) -> cm.Trace:
    """``fused_linear_var_loss(..., grad_accum_dtype=weight.dtype)``: the weight gradient accumulated in
    the parameter dtype (bf16 addmm_ into a bf16 [V, H] accumulator, fp32 inside each GEMM)."""
    from varkernels.core.linear import default_chunk_size

    with FakeTensorMode():
        h = _cuda(B, c.T, c.H)
        labels = torch.zeros(c.tokens, dtype=torch.long, device="cuda")
        coef = _cuda(c.tokens, dtype=F32)
        if c.master:
            tr = cm.varkernels_linear(h, None, labels, coef, master_weight=_cuda(c.V, c.H, dtype=F32),
                                      accum_fp32=False)
        else:
            tr = cm.varkernels_linear(h, _cuda(c.V, c.H), labels, coef, accum_fp32=False)
    tr.method = f"traced, grad_accum_dtype=bf16 (chunk {default_chunk_size(c.V, 'cuda', 2)} rows)"
    return tr


def trace_varkernels_logits(c: Case) -> cm.Trace:
    with FakeTensorMode():
        labels = torch.zeros(c.tokens, dtype=torch.long, device="cuda")
        return cm.varkernels_logits(_cuda(B, c.T, c.V), labels, _cuda(c.tokens, dtype=F32))


def trace_torch_lce(c: Case) -> cm.Trace:
    """F.linear_cross_entropy(h, W, y, reduction="none", options=LinearCrossEntropyOptions()) as a VAR user
    calls it (per-token losses, then Σ coef·lp): its forward (loss only) and its backward (the chunked
    gradients recomputed with the per-token upstream gradient), the two calls of its accumulator."""
    import torch.nn.modules.linear_cross_entropy as lce

    with FakeTensorMode():
        h = _cuda(c.tokens, c.H)
        w32 = _cuda(c.V, c.H, dtype=F32) if c.master else None
        w_in = None if c.master else _cuda(c.V, c.H)
        y = torch.zeros(c.tokens, dtype=torch.long, device="cuda")
        g_out = _cuda(c.tokens)  # d loss / d per-token loss, in the loss dtype
        o = torch.nn.LinearCrossEntropyOptions()._adjust(num_batches=c.tokens, in_features=c.H,
                                                         num_classes=c.V, dtype=BF16, device=h.device)
        # "auto" picks fp32 accumulation for bf16 on CUDA sm_80+ (torch.cuda is absent here)
        o = dataclasses.replace(o, acc_dtype=F32)

        def run():
            w = w32.to(BF16) if c.master else w_in
            args = (h, w, y, None, None, "none", -100, 0.0, o.batch_chunk_size, o.acc_policy, o.acc_dtype)
            loss = lce._linear_cross_entropy_batch_chunked_accumulator(*args, False, False, False)[0]
            _, gh, gw, _ = lce._linear_cross_entropy_batch_chunked_accumulator(*args, True, True, False,
                                                                                loss_grad_output=g_out)
            if c.master:
                gw = gw.to(F32)  # autograd's backward of weight.to(bf16)
                del w
            return loss, gh, gw

        tr = cm.trace_call(run, returned=lambda r: [r[1], r[2]])
    tr.method = (f"traced (chunk {o.batch_chunk_size} rows, acc_policy={o.acc_policy}, "
                 f"acc_dtype={str(o.acc_dtype).removeprefix('torch.')})")
    return tr


def trace_naive(c: Case, form: str) -> cm.Trace:
    """benchmarks/naive.py forward + loss.backward() with autograd, on fake CPU tensors."""
    with FakeTensorMode():
        labels = torch.zeros(B, c.T, dtype=torch.long)
        R, Q = torch.empty(B, B), torch.empty(B, B)
        if form == "logits":
            x = torch.empty(B, c.T, c.V, dtype=BF16, requires_grad=True)

            def run():
                naive_var_loss(x, labels, R, Q).backward()
                return [x.grad]
        else:
            h = torch.empty(B, c.T, c.H, dtype=BF16, requires_grad=True)
            w = torch.empty(c.V, c.H, dtype=F32 if c.master else BF16, requires_grad=True)

            def run():
                naive_linear_var_loss(h, w.to(BF16) if c.master else w, labels, R, Q).backward()
                return [h.grad, w.grad]

        tr = cm.trace_call(run, returned=lambda r: r)
    tr.method = "traced (autograd on fake CPU tensors, costed as CUDA)"
    return tr


def trace_naive_ce(c: Case, *, upcast: bool = True) -> cm.Trace:
    """Plain cross-entropy on materialised logits, ``F.cross_entropy((h @ Wᵀ).float(), y)`` (``upcast=False``:
    on the bf16 logits), forward + ``backward()`` with autograd on fake CPU tensors as :func:`trace_naive`.
    Not a provider of the table (the VAR loss's baseline is :func:`trace_naive`): the calibration test costs
    published cross-entropy measurements with it (tests/test_cost_model_calibration.py)."""
    with FakeTensorMode():
        h = torch.empty(c.tokens, c.H, dtype=BF16, requires_grad=True)
        w = torch.empty(c.V, c.H, dtype=BF16, requires_grad=True)
        y = torch.zeros(c.tokens, dtype=torch.long)

        def run():  # the logits are a temporary (no name holds them through the backward)
            torch.nn.functional.cross_entropy((h @ w.t()).float() if upcast else h @ w.t(), y).backward()
            return [h.grad, w.grad]

        tr = cm.trace_call(run, returned=lambda r: r)
    tr.method = f"traced (autograd on fake CPU tensors, costed as CUDA; {'fp32' if upcast else 'bf16'} logits CE)"
    return tr


# ---------------------------------------------------------------------------------------- counted


def _master_cast_in(k: cm.CountedTrace, c: Case) -> int:
    """weight.to(bf16) of the fp32 master weight: returns the bytes of the bf16 copy (alive until the end)."""
    vh = c.V * c.H
    k.kernel("weight.to(bf16)", 4 * vh, 2 * vh)
    return k.alloc(2 * vh)


def _master_cast_out(k: cm.CountedTrace, c: Case, w16_bytes: int) -> int:
    """bf16 weight gradient -> fp32 (autograd's backward of the cast); returns the bytes returned."""
    vh = c.V * c.H
    k.kernel("grad_W.to(fp32)", 2 * vh, 4 * vh)
    k.alloc(4 * vh)
    k.free(2 * vh)  # the bf16 gradient
    k.free(w16_bytes)
    return 4 * vh


def count_liger_flce(c: Case, *, reduction: str = "none", accum_fp32: bool = True) -> cm.Trace:
    """Liger-Kernel 0.8.5 ``LigerFusedLinearCrossEntropyFunction`` (liger_kernel/ops/fused_linear_cross_entropy.py).
    Chunk = next_pow2(ceil(N / ceil(V/H))) rows; logits chunks [chunk, V] in bf16 in DRAM.

    ``reduction="none"`` (as a VAR user calls it, the provider of the table): the forward computes the loss only;
    the backward recomputes the chunked logits with the per-token upstream gradient. ``reduction="mean"`` (a
    scalar loss, as an SFT loss calls it; tests/test_cost_model_calibration.py): one pass in the forward computes
    the loss and both gradients; the backward skips its scaling when the upstream gradient is 1.
    ``accum_fp32``: the weight gradient accumulated in fp32 (``accum_dtype=torch.float32``, cast to bf16 at the
    end) or, False, in the parameter dtype (Liger's default ``accum_dtype=None``: bf16 ``addmm`` into a bf16
    buffer)."""
    if reduction not in ("none", "mean"):
        raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")
    N, H, V = c.tokens, c.H, c.V
    acc = F32 if accum_fp32 else BF16
    k = cm.CountedTrace()
    w16 = _master_cast_in(k, c) if c.master else 0
    chunk = min(2 ** math.ceil(math.log2(math.ceil(N / math.ceil(V / H)))), N)
    chunks = [min(chunk, N - s) for s in range(0, N, chunk)]
    if reduction == "none":
        # forward: grad_input zeros (allocated even without gradients), loss-only CE kernel (1 read)
        gi = k.alloc(N * H * 2)
        k.kernel("zeros grad_input", 0, N * H * 2)
        logits = k.alloc(chunk * V * 2)
        for n in chunks:
            k.gemm(n, V, H, BF16, BF16, name="logits = h·Wᵀ (forward)")
            k.kernel("liger_cross_entropy_kernel (loss only: 1 read)", n * V * 2, n * 4)
        k.free(logits)
        k.free(gi)
    # the pass that computes the gradients: the backward's recompute ("none") or the forward itself ("mean")
    k.alloc(N * H * 2)
    k.kernel("zeros grad_input", 0, N * H * 2)
    k.alloc(V * H * acc.itemsize)
    k.kernel(f"zeros grad_weight {'fp32' if accum_fp32 else 'bf16'}", 0, V * H * acc.itemsize)
    logits = k.alloc(chunk * V * 2)
    where = "backward recompute" if reduction == "none" else "forward"
    for n in chunks:
        k.gemm(n, V, H, BF16, BF16, name=f"logits = h·Wᵀ ({where})")
        k.kernel("liger_cross_entropy_kernel (2 reads + 1 write, in place)", 2 * n * V * 2, n * V * 2)
        tmp = 0
        if reduction == "none":
            tmp = k.alloc(n * V * 2)
            k.kernel("grad_logits * token_grad_output", n * V * 2, n * V * 2)
        k.gemm(n, H, V, BF16, BF16, name="grad_h = g·W")
        k.gemm(V, H, n, BF16, acc, name=f"grad_W += gᵀ·h (addmm {'out_dtype fp32' if accum_fp32 else 'bf16'})",
               accumulate=True)
        k.free(tmp)
    k.free(logits)
    if accum_fp32:
        k.alloc(V * H * 2)
        k.kernel("grad_weight.to(bf16)", V * H * 4, V * H * 2)
        k.free(V * H * 4)
    returned = N * H * 2 + (_master_cast_out(k, c, w16) if c.master else V * H * 2)
    tr = k.trace(returned)
    variant = "" if (reduction, accum_fp32) == ("none", True) else (
        f", reduction={reduction}, {'fp32' if accum_fp32 else 'bf16'} accumulator")
    tr.method = f"counted (published algorithm; chunk {chunk} rows{variant})"
    return tr


def count_liger_ce(c: Case, *, elem_bytes: int = 2, per_token_grad: bool = True,
                   accumulate_into_grad: bool = False) -> cm.Trace:
    """Liger ``liger_cross_entropy(logits, y, reduction="none")``: the forward kernel writes the gradient
    into the logits (2 reads + 1 write); the backward multiplies it by the per-token upstream gradient
    (``_input * grad_output[:, None]``: a new [N, V] tensor, the returned gradient).

    ``per_token_grad=False``: a scalar loss (reduction="mean") whose upstream gradient is 1: the backward
    returns the in-place gradient as is (no new tensor). ``accumulate_into_grad``: repeated calls without
    resetting ``.grad`` (how Liger's own benchmark times "full"): autograd adds the new gradient into ``.grad``,
    which is the same storage (the logits' own), one read + one write of the logits
    (tests/test_cost_model_calibration.py). ``elem_bytes``: 2 for bf16 logits, 4 for fp32."""
    N, V, e = c.tokens, c.V, elem_bytes
    k = cm.CountedTrace()
    k.kernel("liger_cross_entropy_kernel (2 reads + 1 write, in place)", 2 * N * V * e, N * V * e + N * e)
    if per_token_grad:
        k.alloc(N * V * e)
        k.kernel("grad * grad_output[:, None]", N * V * e + N * e, N * V * e)
    if accumulate_into_grad:
        k.kernel("AccumulateGrad: .grad += gradient (the same storage)", N * V * e, N * V * e)
    tr = k.trace(N * V * e if per_token_grad else 0)
    tr.method = "counted (published algorithm)"
    return tr


def count_cce(c: Case) -> cm.Trace:
    """Cut Cross-Entropy 25.1.1, impl="cce": logits recomputed block by block in on-chip memory, never in
    DRAM. Forward: one logits GEMM fused with the logsumexp (+ the target logits, an indexed dot).
    Backward: logits recomputed and both gradient GEMMs in one kernel (bf16 de and dc). GEMM bytes are
    counted once per operand (the tile re-reads a GEMM serves from L2/shared memory, and the locked
    accumulation of de and dc, are not counted); the gradient filter (filter_eps) is data-dependent and
    counted as skipping nothing."""
    N, H, V = c.tokens, c.H, c.V
    k = cm.CountedTrace()
    w16 = _master_cast_in(k, c) if c.master else 0
    k.gemm(N, V, H, BF16, F32, name="cce_lse_forward (logits in SRAM)")
    k.ops[-1].writes = N * 4  # only the logsumexp leaves the chip
    k.alloc(N * 4)
    k.kernel("indexed_dot h·W[y]", 2 * N * H * 2, N * 4)
    k.alloc(N * H * 2 + V * H * 2)
    k.kernel("zeros de, dc", 0, N * H * 2 + V * H * 2)
    for name in ("cce_backward: logits recomputed (SRAM)", "cce_backward: de = g·W", "cce_backward: dc = gᵀ·h"):
        k.gemm(N, V, H, BF16, F32, name=name)
        k.ops[-1].reads, k.ops[-1].writes = 0, 0
    k.ops[-3].reads = N * H * 2 + V * H * 2 + 2 * N * 4  # e, c, lse, do read once
    k.ops[-2].writes = N * H * 2
    k.ops[-1].writes = V * H * 2
    k.kernel("indexed_dot backward (target rows)", 3 * N * H * 2, 2 * N * H * 2)
    k.free(N * 4)
    returned = N * H * 2 + (_master_cast_out(k, c, w16) if c.master else V * H * 2)
    tr = k.trace(returned)
    tr.method = "counted (published algorithm; no gradient filtering)"
    return tr


# ---------------------------------------------------------------------------------------- log-prob heads


def trace_varkernels_linear_logps(c: Case) -> cm.Trace:
    """``linear_sequence_logps`` (backward mode) as its autograd Function drives it on fake CUDA tensors: the
    forward pass (one logits GEMM per chunk, the logsumexp saved), then the backward pass with the
    per-token upstream gradient (logits recomputed, grad_h and grad_W: three GEMMs per chunk) and the casts
    to the parameter dtype. Four GEMMs in all, where ``fused_linear_var_loss`` (forward mode) does three."""
    import unittest.mock

    from varkernels.core.autograd import LinearTokenFunction
    from varkernels.core.linear import default_chunk_size
    from varkernels.core.token import TokenOptions

    chunk = default_chunk_size(c.V, "cuda", 2)
    opts = TokenOptions("triton", chunk_size=chunk)
    with FakeTensorMode():
        h = _cuda(B, c.T, c.H)
        labels = torch.zeros(c.tokens, dtype=torch.long, device="cuda")
        w32 = _cuda(c.V, c.H, dtype=F32) if c.master else None
        w_in = None if c.master else _cuda(c.V, c.H)
        grad_lp = _cuda(c.tokens, dtype=F32)

        def run():
            # LinearTokenFunction's own forward and backward (backward mode: dlp=None), with the operator's
            # Python body traced in place of its fake, as cm.varkernels_linear does for forward mode
            w = w32.to(BF16) if c.master else w_in
            ctx = cm._Ctx()
            with unittest.mock.patch.object(torch.ops.varkernels, "linear_token_pass", cm._linear_op_body):
                _, lp = LinearTokenFunction.forward(ctx, h, w, None, labels, None, opts, (True, True, False), w.dtype)
                gh, gw_param, *_ = LinearTokenFunction.backward(ctx, None, grad_lp)
            del ctx  # the saved logsumexp
            if c.master:
                gw_param = gw_param.to(F32)  # autograd's backward of weight.to(bf16)
                del w
            return lp, gh, gw_param

        tr = cm.trace_call(run, returned=lambda r: [r[1], r[2]])
    tr.method = f"traced, backward mode (chunk {chunk} rows, fp32 accumulator)"
    return tr


TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE; trainer chunk_size


def count_trl_chunked_logprob(c: Case) -> cm.Trace:
    """TRL 1.16's ``ChunkedLogProbFunction`` as its patched causal-LM forward calls it on a Triton device
    (trl/trainer/utils.py: only the valid positions, ``hidden[mask]``, then ``masked_scatter``): tiles of
    [4096 tokens, 32768 vocabulary] in a reused bf16 buffer. Forward: per tile one logits GEMM (``torch.mm``
    into the tile) and a Triton kernel folding it into online-logsumexp statistics (one read). Backward:
    per tile the logits recomputed, a Triton kernel turning the tile into its gradient in place (one read,
    one write), and grad_h / grad_W accumulated by ``addmm(..., out_dtype=float32)`` into fp32 buffers, cast
    to the parameter dtype at the end: four GEMMs. Counted from that code, not traced: its Triton kernels
    cannot run on fake tensors. With an fp32 master weight (autocast) each tile's weight slice is cast to
    bf16 where it is used (``weight[start:end].to(compute_dtype)``, forward and backward), and grad_W stays
    fp32 (the weight's dtype)."""
    N, H, V = c.tokens, c.H, c.V
    k = cm.CountedTrace()
    tok = [min(TRL_TOKEN_CHUNK, N - s) for s in range(0, N, TRL_TOKEN_CHUNK)]
    voc = [min(TRL_VOCAB_CHUNK, V - s) for s in range(0, V, TRL_VOCAB_CHUNK)]
    # forward: the gathered valid rows (saved for backward), seven [N] fp32 statistics, the tile buffer
    h_sel = k.alloc(N * H * 2)
    k.kernel("hidden[mask] (gather)", N * H * 2, N * H * 2)
    stats = k.alloc(7 * N * 4)
    k.kernel("statistics init (full/zeros)", 0, 7 * N * 4)
    buf = k.alloc(min(N, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * 2)

    def weight_tile(vt):
        if c.master:
            k.kernel("weight[start:end].to(bf16)", vt * H * 4, vt * H * 2)

    for n in tok:
        for vt in voc:
            weight_tile(vt)
            k.gemm(n, vt, H, BF16, BF16, name="tile = h·W[v0:v1]ᵀ (forward)")
            k.kernel("_forward_kernel (online logsumexp, 1 read)", n * vt * 2 + 6 * n * 4, 3 * n * 4)
    k.free(buf)
    k.kernel("logprobs = target - log_z", 3 * N * 4, 2 * N * 4)
    k.free(stats)
    k.alloc(2 * N * 4)  # log_z (saved), logprobs
    # backward
    gh32 = k.alloc(N * H * 4)
    gw32 = k.alloc(V * H * 4)
    k.kernel("zeros grad_hidden, grad_weight (fp32)", 0, N * H * 4 + V * H * 4)
    buf = k.alloc(min(N, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * 2)
    for n in tok:
        for vt in voc:
            weight_tile(vt)
            k.gemm(n, vt, H, BF16, BF16, name="tile = h·W[v0:v1]ᵀ (backward recompute)")
            k.kernel("_backward_kernel (gradient in place: 1 read, 1 write)", n * vt * 2 + 3 * n * 4, n * vt * 2)
            k.gemm(n, H, vt, BF16, F32, name="grad_h += tile·W (addmm out_dtype fp32)", accumulate=True)
            k.gemm(vt, H, n, BF16, F32, name="grad_W += tileᵀ·h (addmm out_dtype fp32)", accumulate=True)
    k.free(buf)
    k.alloc(N * H * 2)
    k.kernel("grad_hidden.to(bf16)", N * H * 4, N * H * 2)
    k.free(gh32)
    if not c.master:
        k.alloc(V * H * 2)
        k.kernel("grad_weight.to(bf16)", V * H * 4, V * H * 2)
        k.free(gw32)
    k.kernel("masked_scatter backward: zeros + index_put", N * H * 2, 2 * N * H * 2)
    k.free(h_sel)
    returned = N * H * 2 + (V * H * 4 if c.master else V * H * 2)
    tr = k.trace(returned)
    tr.method = (f"counted (published algorithm; tiles {TRL_TOKEN_CHUNK} tokens x {TRL_VOCAB_CHUNK} vocabulary, "
                 "fp32 accumulators)")
    return tr


LOGPS_PROVIDERS = [
    ("linear", "varkernels[logps] (backward mode)", trace_varkernels_linear_logps),
    ("linear", "trl[chunked_logprob]", count_trl_chunked_logprob),
]


# ---------------------------------------------------------------------------------------- table


PROVIDERS = [
    ("linear", "varkernels[triton]", trace_varkernels_linear),
    ("linear", "varkernels[auto,param_accum]", trace_varkernels_linear_param_accum),  # the GPU suite's names
    ("linear", "naive", lambda c: trace_naive(c, "linear")),
    ("linear", "torch[linear_cross_entropy]", trace_torch_lce),
    ("linear", "liger[flce]", count_liger_flce),
    ("linear", "cce[cce]", count_cce),
    ("logits", "varkernels[triton]", trace_varkernels_logits),
    ("logits", "naive", lambda c: trace_naive(c, "logits")),
    ("logits", "liger[ce]", count_liger_ce),
    *LOGPS_PROVIDERS,
]


def rows_for(c: Case, gpus) -> list:
    rows = []
    ref = cm.three_gemms(c.tokens, c.H, c.V)
    for form, name, fn in PROVIDERS:
        if form == "logits" and c.master:
            continue  # no weight in the logits form
        tr = fn(c)
        for gpu in gpus:
            est = tr.estimate_seconds(gpu)
            ref_s = ref.estimate_seconds(gpu)
            top = "; ".join(f"{op} {s * 1e3:.2f} ms" for op, s in tr.breakdown(gpu, 3))
            gemm_classes = sorted({r.flop_class for r in tr.gemms()})
            rows.append({
                "gpu": gpu.name, "head": c.head, "H": c.H, "V": c.V, "tokens": c.tokens, "B": B, "T": c.T,
                "weights": c.weights, "form": form, "provider": name, "method": tr.method,
                "gemm_tflop": round(tr.flops / 1e12, 3), "gemm_dtypes": "/".join(gemm_classes),
                "gbytes": round(tr.nbytes / 1e9, 3), "est_ms": round(est * 1e3, 3),
                "three_bf16_gemms_ms": round(ref_s * 1e3, 3) if form == "linear" else "",
                "ratio_vs_three_gemms": round(est / ref_s, 3) if form == "linear" else "",
                "peak_extra_gb": round(tr.peak_extra_bytes / 1e9, 3),
                "top_ops": top, "estimate": "roofline ESTIMATE, not measured",
            })
    return rows
