"""The VAR loss as each alternative a user could pick would compute it: the providers of the benchmarks
(bench_peers.py, gpu_suite.py, test_bench_var_loss.py) and of tests/test_peers.py.

Every provider computes the same loss — docs/design.md §1 with its defaults (``weighting="posterior"``,
``logp_reduction="mean"``, β = 1): per-token log-probs → per-sequence mean s_i → stop-gradient
posterior weights w_i from the B×B matrices → loss = −(1/B)·Σ w_i·s_i — from one of:

form ``logits`` (input: logits [B, T, V])
    naive                  benchmarks/naive.py: log_softmax over [B, T, V], gather, masked mean
    torch.compile(naive)   the same function through ``torch.compile`` (inductor)
    varkernels[cpu]        ``fused_var_loss(..., backend="cpu")``, the C++ kernel of csrc/
    varkernels[torch]      ``fused_var_loss(..., backend="torch")``, the chunked PyTorch path
    varkernels[triton]     ``fused_var_loss(..., backend="triton")``: a GPU, or the interpreter
    liger[ce]              Liger-Kernel ``liger_cross_entropy(logits, y, reduction="none")`` → −lp
                           per token (Triton; writes the logits' gradient into the logits)
    cce                    no logits-input form: Cut Cross-Entropy takes embeddings and classifier

form ``linear`` (input: hidden [B, T, H] and lm-head weight [V, H])
    naive, torch.compile(naive)   hidden @ weight.T, then the naive loss
    varkernels[cpu|torch|triton]  ``fused_linear_var_loss(..., backend=...)``
    liger[flce]            Liger ``liger_fused_linear_cross_entropy(h, W, y, reduction="none")``
                           (Triton; accum_dtype=float32, as varkernels accumulates grad W)
    liger[chunked]         Liger's chunked-loss log-prob piece (``_ChunkedSelectiveLogProbFunction``
                           of ``liger_kernel.chunked_loss.fused_linear_ppo``, the per-token log-probs
                           of its GRPO/PPO losses): plain PyTorch chunked over tokens and vocabulary,
                           logits recomputed in backward. A private name: it may move between
                           Liger releases, and the provider then skips with that reason.
    cce[cce]               Cut Cross-Entropy ``linear_cross_entropy(h, W, y, reduction="none",
                           impl="cce")`` (Triton; default ``filter_eps="high"`` gradient filtering)
    cce[torch_compile]     the same call with ``impl="torch_compile"`` (its CPU-capable path)
    varkernels[logps]      VAR on ``linear_sequence_logps(h, W, labels, reduction="mean")``: the log-prob
                           primitive's backward mode (logits recomputed in backward: four GEMMs, where
                           ``fused_linear_var_loss``'s forward mode does three)
    trl[chunked_logprob]   TRL 1.16's chunked fused head ``trl.kernels.ChunkedLogProbFunction`` (what its
                           trainers call for per-token log-probs), called as TRL's patched forward calls
                           it off Triton devices: every position scored (labels clamped, masked after),
                           TRL's vocabulary chunk (``_CHUNKED_LOGPROB_CHUNK_SIZE``); backward mode, four
                           GEMMs, fp32 gradient accumulators; on CPU its PyTorch tile path
    torch[linear_cross_entropy]
                           PyTorch's own chunked ``torch.nn.functional.linear_cross_entropy(h, W, y,
                           reduction="none", options=torch.nn.LinearCrossEntropyOptions())`` (torch ≥
                           2.13; default options: chunk size and accumulation policy picked per device
                           and dtype by torch). Plain PyTorch ops, CPU and CUDA; its bf16 output (the
                           per-token loss) is in bf16.

The peers give per-token cross-entropy (= −lp); the VAR reduction and the weights around them are
the few lines ``var_from_token_logps`` below — what a user building VAR on them would write.

``get_providers(form, device)`` returns every provider with either a callable ``loss(inputs)`` or
the reason it cannot run in this process; ``check_providers`` compares each against naive eager.
A provider that runs Triton kernels (``uses_triton``) runs on CUDA tensors, or on CPU tensors only
under ``TRITON_INTERPRET=1`` — where its wall time measures the interpreter, never the kernel.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
from typing import Callable, Optional

import torch

from tools.naive import naive_linear_var_loss, naive_var_loss

FORMS = ("logits", "linear")
IGNORE_INDEX = -100


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def peer_versions() -> dict:
    """Versions of the peers, for the CSV rows."""
    return {"varkernels": package_version("varkernels"), "liger_kernel": package_version("liger-kernel"),
            "cut_cross_entropy": package_version("cut-cross-entropy")}


# ----------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass
class Inputs:
    """One micro-batch. ``logits`` [B, T, V] for form "logits"; ``hidden`` [B, T, H] and
    ``weight`` [V, H] for form "linear"; ``labels`` [B, T] int64 with ``IGNORE_INDEX`` on the
    prompt; ``rewards`` / ``ref_logps`` [B, B] fp32."""

    form: str
    labels: torch.Tensor
    rewards: torch.Tensor
    ref_logps: torch.Tensor
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None

    @property
    def params(self) -> list:
        """The tensors the loss differentiates (their .grad is reset before each step)."""
        return [self.logits] if self.form == "logits" else [self.hidden, self.weight]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def clone(self) -> Inputs:
        """A deep copy (peers that overwrite their input — Liger's CE — get their own)."""
        def c(t):
            return None if t is None else t.detach().clone().requires_grad_(t.requires_grad)

        return dataclasses.replace(self, logits=c(self.logits), hidden=c(self.hidden), weight=c(self.weight))

    @property
    def tokens(self) -> int:
        return self.labels.numel()

    @property
    def input_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)


def make_inputs(form, B, T, V, dtype, device="cpu", H=512, prompt_frac=0.25, seed=0) -> Inputs:
    """Random inputs of docs/design.md §1's shapes; the first ``prompt_frac`` of every row is prompt.

    Generated on ``device`` by a generator seeded there, directly in ``dtype`` (``randn(..., dtype=dtype)``, then
    scaled in place): no host-side fp32 copy. At the Gemma-2 head with 32k tokens the logits are 16.8 GB in bf16;
    a host fp32 ``randn`` then ``.to(device, dtype)`` held 33.5 GB of host memory twice and copied it over PCIe.
    The values depend on the device's generator (CPU and CUDA draw different numbers for the same seed)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g, device=device)
    labels[:, : int(T * prompt_frac)] = IGNORE_INDEX
    rewards = torch.randn(B, B, generator=g, device=device)
    ref_logps = -2 - torch.rand(B, B, generator=g, device=device)
    common = dict(form=form, labels=labels, rewards=rewards, ref_logps=ref_logps)
    if form == "logits":
        logits = torch.randn(B, T, V, generator=g, device=device, dtype=dtype).mul_(2).requires_grad_()
        return Inputs(logits=logits, **common)
    hidden = torch.randn(B, T, H, generator=g, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, device=device, dtype=dtype).mul_(H**-0.5).requires_grad_()
    return Inputs(hidden=hidden, weight=weight, **common)


# ----------------------------------------------------------------------------------------------
# the VAR reduction a user writes around a per-token log-prob primitive


def var_from_token_logps(token_logps, labels, rewards, ref_logps, beta=1.0, ignore_index=IGNORE_INDEX):
    """loss = −(1/B)·Σ_i w_i·s_i from per-token log-probs [B, T] (any value at ignored positions):
    s_i = masked mean over the response, w_i = B·softmax_j(R[i, :]/β + Q[i, :])[i] (stop-gradient)."""
    mask = labels != ignore_index
    lp = torch.where(mask, token_logps.float(), 0.0)
    s = lp.sum(-1) / mask.sum(-1).clamp(min=1)
    with torch.no_grad():
        A = rewards / beta + ref_logps
        log_z = torch.logsumexp(A, dim=-1) - math.log(A.shape[0])
        w = torch.exp(A.diagonal() - log_z)
    return -(w * s).mean()


# ----------------------------------------------------------------------------------------------
# providers


@dataclasses.dataclass
class Provider:
    name: str
    form: str
    description: str
    loss: Optional[Callable[[Inputs], torch.Tensor]] = None  # None: cannot run here, see skip
    skip: Optional[str] = None
    uses_triton: bool = False  # Triton kernels: CUDA tensors, or CPU tensors under the interpreter
    overwrites_input: bool = False  # its forward writes into the caller's logits

    @property
    def runnable(self) -> bool:
        return self.loss is not None and self.skip is None


def _import_error(what: str, exc: BaseException) -> str:
    return f"{what} is not importable here ({type(exc).__name__}: {exc}); pip install it (see docs/benchmarks.md)"


def _triton_skip(device: torch.device) -> Optional[str]:
    """Why a Triton provider cannot run on ``device`` in this process, or None."""
    if device.type == "cuda":
        return None
    if interpreting():
        return None
    return ("Triton kernels run on a GPU; on CPU only under TRITON_INTERPRET=1, whose wall time measures "
            "the interpreter, not the kernel (checked there instead, and for the logits-input form its bytes "
            "are counted: bench_peers.py --part traffic)")


_compiled = {}


def _compiled_naive(form: str):
    """``torch.compile`` of the naive loss, made once per process (dynamo caches per shape)."""
    if form not in _compiled:
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit"):  # one entry per benchmarked shape
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 64)
        _compiled[form] = torch.compile(naive_var_loss if form == "logits" else naive_linear_var_loss)
    return _compiled[form]


def _varkernels_providers(form: str, device: torch.device) -> list:
    from varkernels import fused_linear_var_loss, fused_var_loss
    from varkernels._backend import cpu_extension_available

    out = []
    for backend in ("cpu", "torch", "triton"):
        skip = None
        if backend == "cpu":
            if device.type != "cpu":
                skip = "backend='cpu' is the C++ kernel for CPU tensors"
            elif not cpu_extension_available():
                skip = ("the C++ CPU extension is not built on this machine "
                        "(varkernels._backend.cpu_extension_available() is False)")
        elif backend == "triton":
            skip = _triton_skip(device)
        if form == "logits":
            def loss(x, backend=backend):
                return fused_var_loss(x.logits, x.labels, x.rewards, x.ref_logps, backend=backend)
            desc = f'fused_var_loss(..., backend="{backend}")'
        else:
            def loss(x, backend=backend):
                return fused_linear_var_loss(x.hidden, x.weight, x.labels, x.rewards, x.ref_logps, backend=backend)
            desc = f'fused_linear_var_loss(..., backend="{backend}")'
        out.append(Provider(f"varkernels[{backend}]", form, desc, loss, skip, uses_triton=backend == "triton"))
    if form == "linear":  # the weight gradient accumulated in the parameter dtype (bf16 runs: V·H·2 bytes less)
        def loss_param_accum(x):
            return fused_linear_var_loss(x.hidden, x.weight, x.labels, x.rewards, x.ref_logps,
                                         grad_accum_dtype=x.weight.dtype)
        out.append(Provider("varkernels[auto,param_accum]", form,
                            'fused_linear_var_loss(..., grad_accum_dtype=weight.dtype)', loss_param_accum))
    return out


def _liger_providers(form: str, device: torch.device) -> list:
    if form == "logits":
        name, desc = "liger[ce]", 'liger_cross_entropy(logits, labels, reduction="none") → per-token −lp'
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy
        except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip
            return [Provider(name, form, desc, skip=_import_error("liger-kernel", e), uses_triton=True)]

        def loss(x):
            B, T, V = x.logits.shape
            ce = liger_cross_entropy(x.logits.reshape(B * T, V), x.labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none")
            return var_from_token_logps(-ce.view(B, T), x.labels, x.rewards, x.ref_logps)

        return [Provider(name, form, desc, loss, _triton_skip(device), uses_triton=True, overwrites_input=True)]

    out = []
    name, desc = "liger[flce]", 'liger_fused_linear_cross_entropy(h, W, labels, reduction="none", accum_dtype=fp32)'
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        out.append(Provider(name, form, desc, skip=_import_error("liger-kernel", e), uses_triton=True))
    else:
        def loss(x):
            B, T, H = x.hidden.shape
            ce = liger_fused_linear_cross_entropy(x.hidden.reshape(B * T, H), x.weight, x.labels.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="none",
                                                  accum_dtype=torch.float32)
            return var_from_token_logps(-ce.view(B, T), x.labels, x.rewards, x.ref_logps)

        out.append(Provider(name, form, desc, loss, _triton_skip(device), uses_triton=True))

    name, desc = "liger[chunked]", "liger chunked_loss _ChunkedSelectiveLogProbFunction (PyTorch, token×vocab chunks)"
    try:
        from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as Chunked
    except Exception as e:  # noqa: BLE001
        out.append(Provider(name, form, desc, skip=_import_error("liger_kernel.chunked_loss.fused_linear_ppo."
                                                                 "_ChunkedSelectiveLogProbFunction", e)))
    else:
        def loss(x):
            B, T, H = x.hidden.shape
            targets = x.labels.clamp(min=0).reshape(-1)  # ignored positions are masked after
            lp = Chunked.apply(x.hidden.reshape(B * T, H), x.weight, targets, None, 1.0, 4096)
            return var_from_token_logps(lp.view(B, T), x.labels, x.rewards, x.ref_logps)

        out.append(Provider(name, form, desc, loss))
    return out


def _cce_providers(form: str, device: torch.device) -> list:
    if form == "logits":
        return [Provider("cce", form, "Cut Cross-Entropy",
                         skip="no logits-input form: linear_cross_entropy takes embeddings and the classifier")]
    out = []
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        reason = _import_error("cut-cross-entropy", e)
        return [Provider(f"cce[{impl}]", form, "Cut Cross-Entropy", skip=reason, uses_triton=impl == "cce")
                for impl in ("cce", "torch_compile")]
    for impl in ("cce", "torch_compile"):
        def loss(x, impl=impl):
            ce = linear_cross_entropy(x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX,
                                      reduction="none", impl=impl)
            return var_from_token_logps(-ce, x.labels, x.rewards, x.ref_logps)

        skip = _triton_skip(device) if impl == "cce" else None
        desc = f'linear_cross_entropy(h, W, labels, reduction="none", impl="{impl}")'
        out.append(Provider(f"cce[{impl}]", form, desc, loss, skip, uses_triton=impl == "cce"))
    return out


def _torch_lce_providers(form: str, device: torch.device) -> list:
    if form == "logits":
        return []  # a fused-linear loss only
    name = "torch[linear_cross_entropy]"
    desc = ('torch.nn.functional.linear_cross_entropy(h, W, labels, reduction="none", '
            'options=LinearCrossEntropyOptions())')
    fn = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options_cls is None:
        return [Provider(name, form, desc, skip=f"torch {torch.__version__} has no torch.nn.functional."
                                                "linear_cross_entropy with LinearCrossEntropyOptions (torch >= 2.13)")]

    def loss(x):
        B, T, H = x.hidden.shape
        ce = fn(x.hidden.reshape(B * T, H), x.weight, x.labels.reshape(-1), reduction="none",
                ignore_index=IGNORE_INDEX, options=options_cls())
        return var_from_token_logps(-ce.view(B, T), x.labels, x.rewards, x.ref_logps)

    return [Provider(name, form, desc, loss)]


def _logps_providers(form: str, device: torch.device) -> list:
    """varkernels' log-prob primitive (backward mode) and TRL's chunked log-prob head, each with the
    VAR reduction of ``var_from_token_logps`` on top."""
    if form == "logits":
        return []
    from varkernels import linear_sequence_logps

    def ours(x):
        s = linear_sequence_logps(x.hidden, x.weight, x.labels, reduction="none")
        return var_from_token_logps(s, x.labels, x.rewards, x.ref_logps)

    out = [Provider("varkernels[logps]", form, 'linear_sequence_logps(h, W, labels, reduction="none") + VAR', ours)]
    name = "trl[chunked_logprob]"
    desc = "trl.kernels.ChunkedLogProbFunction (TRL 1.16's chunked log-prob head) + VAR"
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except Exception as e:  # noqa: BLE001
        return [*out, Provider(name, form, desc, skip=_import_error("trl.kernels.chunked_logprob", e))]
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocab_chunk
    except Exception:  # noqa: BLE001 - a private name: TRL 1.16's value
        vocab_chunk = 32768

    def trl_loss(x):
        B, T, H = x.hidden.shape
        lp = ChunkedLogProbFunction.apply(x.hidden.reshape(B * T, H), x.weight, None,
                                          x.labels.clamp(min=0).reshape(-1), 1.0, vocab_chunk, None, 1.0,
                                          ("log_probs",))[0]
        return var_from_token_logps(lp.view(B, T), x.labels, x.rewards, x.ref_logps)

    return [*out, Provider(name, form, desc, trl_loss)]


def selected(name: str, wanted, names=()) -> bool:
    """A ``--providers`` choice: a provider's exact name selects only it ("naive" is not torch.compile(naive));
    anything else selects every name containing it ("varkernels", "liger"); none selects every provider."""
    return not wanted or any(w == name or (w not in names and w in name) for w in wanted)


def get_providers(form: str, device="cpu") -> list:
    """All providers of ``form`` ("logits" | "linear"), runnable or with the reason they are not."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    device = torch.device(device)
    if form == "logits":
        naive = Provider("naive", form, "naive eager PyTorch (benchmarks/naive.py)",
                         lambda x: naive_var_loss(x.logits, x.labels, x.rewards, x.ref_logps))
        compiled = Provider("torch.compile(naive)", form, "torch.compile(naive_var_loss)",
                            lambda x: _compiled_naive(form)(x.logits, x.labels, x.rewards, x.ref_logps))
    else:
        naive = Provider("naive", form, "hidden @ weight.T, then the naive loss",
                         lambda x: naive_linear_var_loss(x.hidden, x.weight, x.labels, x.rewards, x.ref_logps))
        compiled = Provider("torch.compile(naive)", form, "torch.compile(naive_linear_var_loss)",
                            lambda x: _compiled_naive(form)(x.hidden, x.weight, x.labels, x.rewards, x.ref_logps))
    return [naive, compiled, *_varkernels_providers(form, device), *_liger_providers(form, device),
            *_cce_providers(form, device), *_torch_lce_providers(form, device), *_logps_providers(form, device)]


# ----------------------------------------------------------------------------------------------
# agreement with naive eager


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def check_providers(form: str, providers: list, device="cpu", dtype=torch.float32, B=2, T=16, V=1000, H=64) -> dict:
    """Loss and gradients of every runnable provider vs naive eager on one small batch.

    Returns {name: (loss rel err, max grad rel err)} or {name: "failed: ..."}; a provider whose
    call raises is marked failed here and its ``skip`` is set to the error (so the sweep does not
    time a provider that cannot compute the loss)."""
    base = make_inputs(form, B, T, V, dtype, device, H=H, seed=1)
    ref = base.clone()
    ref_loss = naive_var_loss(ref.logits, ref.labels, ref.rewards, ref.ref_logps) if form == "logits" else \
        naive_linear_var_loss(ref.hidden, ref.weight, ref.labels, ref.rewards, ref.ref_logps)
    ref_loss.backward()
    out = {}
    for p in providers:
        if not p.runnable or p.name == "naive":
            continue
        x = base.clone()
        try:
            loss = p.loss(x)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - report, skip, go on with the others
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            p.skip = f"raised on this machine: {msg}"
            out[p.name] = f"failed: {msg}"
            continue
        grads = [_rel_err(a.grad, b.grad) for a, b in zip(x.params, ref.params)]
        out[p.name] = (_rel_err(loss.detach(), ref_loss.detach()), max(grads))
    return out
