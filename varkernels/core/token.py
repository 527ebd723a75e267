"""The token op, registered as PyTorch operators on each backend.

For every token row n of x [B, T, V] (any strides) with label y = labels[n]:

    z      = transform(x[n, :])                    softcap c·tanh(x/c), then ·(1/τ)      (fp32)
    lse[n] = logsumexp(z)                          (or lse_in[n]: the first sweep is skipped)
    lp[n]  = z[y] − lse[n]                         0 where y == ignore_index
    grad[n, :] = coef[n]·(softmax(z) − onehot(y))·dz/dx     only when ``grad`` is given
    entropy[n] = −Σ_v p_v·log p_v, p = softmax(z)           only when ``entropy`` is given (0 where ignored)

In PyTorch: ``lp = z.log_softmax(-1).gather(-1, y)`` and ``grad = −coef·d lp/dx``. ``grad`` is
written in its own dtype and may be x itself (the same view): the gradient then overwrites the
logits. The op knows nothing of what the coefficients mean: the layers above choose them.

Operators (schema shared by the three, ``grad`` and ``entropy`` are the only arguments written)::

    varkernels::token_<backend>(Tensor x, Tensor labels, Tensor? coef, Tensor(a!)? grad,
                                Tensor? lse_in, float? softcap, float inv_temperature,
                                int ignore_index, Tensor(b!)? entropy=None) -> (Tensor lp, Tensor lse)

``entropy`` is an optional output argument, [B·T] fp32 contiguous on x's device, written when given:
the entropy of softmax(z) (of the transformed logits), computed in the logsumexp sweep from one more
running sum, Σ e^(z − m)·(z − m), at no extra pass. Not given (the default), the kernels are the ones
without it (a constexpr switch in Triton, a template flag in C++). It cannot be combined with ``lse_in``
(that mode skips the logsumexp sweep).

* ``token_triton`` — ``torch.library.triton_op`` around the Triton token kernels (``wrap_triton``),
  so Inductor sees them: the single-pass ``_token_kernel_single`` for rows that fit on chip
  (V ≤ 32768; 16384 with a softcap or unaligned 16-bit rows), else the tiled two-sweep
  ``_token_kernel`` (``token_kernel_config``). On CPU tensors they run in the Triton interpreter.
* ``token_cpu`` — the C++ kernel of csrc/, registered there with ``TORCH_LIBRARY_FRAGMENT``;
  its fake implementation is registered here, by the loader's ``on_load`` hook, once the extension
  is loaded (the module that owns an operator registers its fake).
* ``token_torch`` — chunked PyTorch (never more than a chunk of fp32 rows alive), a
  ``torch.library.custom_op``.

Each has a fake implementation, so the op runs on fake tensors (and under ``torch.compile``) and
can be recorded with its shapes.

The layers above pass one options record, :class:`TokenOptions`, read by attribute, and coefficients
in their own convention, ``dlp`` = d value / d lp. The record is flattened into the operators' plain
arguments, by keyword, only where an operator is called (core/autograd.py, core/linear.py), and the
sign is fixed once, by :func:`kernel_coef` (the kernels write coef·(softmax − onehot) =
−coef·d lp/dx, so coef = −dlp). :func:`token_kernel` names the operator of a backend.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch.library import custom_op, register_fake, triton_op

from .. import csrc_loader
from .._backend import cpu_extension_available, require_cpu_extension
from .._env import load_triton_ops, on_triton_ops, triton_interpret

CHUNK_BYTES = 16 * 2**20  # fp32 bytes per chunk buffer of the PyTorch path; ~3 such buffers are alive


class TokenOptions(NamedTuple):
    """The options of one call, built where the call is prepared (varkernels/_prepare.py) and passed down
    unchanged, always read by attribute; flattened into operator arguments, by keyword, only where an
    operator is called (``token_args`` for the token op, ``_asdict()`` for the fused-linear driver op)."""

    backend: str  # resolved: "triton" | "cpu" | "torch"
    softcap: Optional[float] = None
    inv_temperature: float = 1.0
    ignore_index: int = -100
    chunk_size: int = 0  # fused-linear form: token rows per chunk
    accum_fp32: bool = True  # fused-linear form: weight/bias gradients accumulate in fp32

    def token_args(self) -> dict:
        """The token op's keyword options (softcap, inv_temperature, ignore_index)."""
        return {"softcap": self.softcap, "inv_temperature": self.inv_temperature, "ignore_index": self.ignore_index}


def kernel_coef(dlp: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels' coefficient from d value / d lp: coef = −dlp (the one place the sign is fixed)."""
    return None if dlp is None else dlp.neg()


def _fake_token(x, labels, coef, grad, lse_in, softcap, inv_temperature, ignore_index, entropy=None):
    n = x.shape[0] * x.shape[1]
    return x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


def check_entropy_out(entropy: Optional[torch.Tensor], x: torch.Tensor, lse_in: Optional[torch.Tensor]) -> None:
    """The token op's ``entropy`` output: [B·T] fp32 contiguous on x's device, and not with ``lse_in``."""
    if entropy is None:
        return
    if lse_in is not None:
        raise ValueError("token op: entropy is computed in the logsumexp sweep, which lse_in skips; pass one of them")
    n = x.shape[0] * x.shape[1]
    if entropy.dtype != torch.float32 or entropy.shape != (n,) or not entropy.is_contiguous() or (
            entropy.device != x.device):
        raise ValueError(f"token op: entropy must be a contiguous float32 [B*T] = [{n}] tensor on {x.device}, got "
                         f"{entropy.dtype} of shape {tuple(entropy.shape)} on {entropy.device}")


def rne_bf16(out) -> bool:
    """True when a Triton kernel must round fp32 → bf16 by hand: only in the interpreter,
    which truncates where GPUs round to nearest even (see ``_triton_kernels._cast_out``)."""
    return out is not None and out.dtype == torch.bfloat16 and out.device.type != "cuda" and triton_interpret()


# ------------------------------------------------------------------------------------ Triton


def token_triton_launch(
    x: torch.Tensor,
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    softcap: Optional[float],
    inv_temperature: float,
    ignore_index: int,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ._triton_kernels import token_kernel_config

    check_entropy_out(entropy, x, lse_in)
    B, T, V = x.shape
    # rows that fit on chip: the single-pass kernel (one read, one write); else the tiled two-sweep one
    kernel, block_v, num_warps = token_kernel_config(V, x.dtype, softcap=softcap)
    N = B * T
    lp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    gs = grad.stride() if grad is not None else (0, 0, 0)
    # torch.library.wrap_triton, looked up at the call: Inductor sees the kernel (tools/aot.py's launch
    # recorders stand in for it while they record)
    torch.library.wrap_triton(kernel)[(N,)](
        x_ptr=x, grad_ptr=grad, labels_ptr=labels, coef_ptr=coef, lse_in_ptr=lse_in,
        lp_ptr=lp, lse_ptr=lse,
        T=T, V=V,
        stride_xb=x.stride(0), stride_xt=x.stride(1), stride_xv=x.stride(2),
        stride_gb=gs[0], stride_gt=gs[1], stride_gv=gs[2],
        softcap=softcap, inv_temperature=inv_temperature, ignore_index=ignore_index,
        BLOCK_V=block_v,
        RNE_BF16=rne_bf16(grad),
        HAS_GRAD=grad is not None, HAS_LSE_IN=lse_in is not None, HAS_SOFTCAP=softcap is not None,
        ent_ptr=entropy, HAS_ENTROPY=entropy is not None,
        num_warps=num_warps,
    )
    return lp, lse


def _register_token_triton() -> None:
    op = triton_op("varkernels::token_triton", mutates_args={"grad", "entropy"})(token_triton_launch)  # imports triton
    op.register_fake(_fake_token)


on_triton_ops(_register_token_triton)  # registered on first use (varkernels._env.load_triton_ops)


# ------------------------------------------------------------------------------------ PyTorch


def _transform(x: torch.Tensor, softcap: Optional[float], inv_temperature: float):
    """fp32 z = transform(x) and dz/dx (a tensor, or a Python float when constant)."""
    z = x.float()
    dz = inv_temperature
    if softcap is not None:
        t = torch.tanh(z / softcap)
        dz = (1.0 - t * t).mul_(inv_temperature)
        z = t.mul_(softcap)
    if inv_temperature != 1.0:
        z = z * inv_temperature if z is x else z.mul_(inv_temperature)  # never write into the caller's x
    return z, dz


@custom_op("varkernels::token_torch", mutates_args={"grad", "entropy"})
def token_torch(
    x: torch.Tensor,
    labels: torch.Tensor,
    coef: Optional[torch.Tensor],
    grad: Optional[torch.Tensor],
    lse_in: Optional[torch.Tensor],
    softcap: Optional[float],
    inv_temperature: float,
    ignore_index: int,
    entropy: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_entropy_out(entropy, x, lse_in)
    B, T, V = x.shape
    N = B * T
    lp = torch.zeros(N, dtype=torch.float32, device=x.device)
    lse = torch.zeros(N, dtype=torch.float32, device=x.device)
    rows = max(1, CHUNK_BYTES // (4 * V))
    for b in range(B):
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            n0, n1 = b * T + t0, b * T + t1
            y = labels[n0:n1].long()
            valid = y != ignore_index
            if not bool(valid.any()):
                if grad is not None:
                    grad[b, t0:t1].zero_()
                if entropy is not None:
                    entropy[n0:n1].zero_()
                continue
            ys = torch.where(valid, y, 0).unsqueeze(1)
            x_c = x[b, t0:t1]
            z, dz = _transform(x_c, softcap, inv_temperature)
            # Shift by the row max m first, then lp = (z_y − m) − log s and p = exp((z − m) − log s):
            # z_y − lse would carry the rounding of lse (~1e-6 for |z| ≈ 20) into a confident token's lp ≈ 0.
            if lse_in is None:
                m = z.amax(dim=1, keepdim=True)
                m = torch.where(torch.isinf(m), 0.0, m)  # an all −inf row: shift by 0, not −inf
                zm = torch.sub(z, m)  # fresh buffer (z may be the caller's x)
                log_s = torch.logsumexp(zm, dim=1, keepdim=True)
                c_lse = (m + log_s).squeeze(1)
            else:
                log_s = lse_in[n0:n1].unsqueeze(1)  # m = 0: z − m is z, copied only when it is the caller's x
                zm = z.clone() if z is x_c else z
                c_lse = lse_in[n0:n1]
            c_lp = zm.gather(1, ys).squeeze(1) - log_s.squeeze(1)
            lp[n0:n1] = torch.where(valid, c_lp, 0.0)
            lse[n0:n1] = torch.where(valid, c_lse, 0.0)
            if entropy is not None:  # H = Σ −p·log p (entr: 0 at p = 0, a −inf logit)
                p_ent = torch.softmax(zm, dim=1)
                entropy[n0:n1] = torch.where(valid, torch.special.entr(p_ent, out=p_ent).sum(dim=1), 0.0)
                del p_ent
            if grad is None:
                continue
            p = zm.sub_(log_s).exp_()  # softmax, in zm's buffer
            p.scatter_add_(1, ys, torch.full_like(c_lse, -1.0).unsqueeze(1))
            p.mul_(torch.where(valid, coef[n0:n1], 0.0).unsqueeze(1))
            if not isinstance(dz, float) or dz != 1.0:
                p.mul_(dz)
            p.masked_fill_(~valid.unsqueeze(1), 0.0)
            grad[b, t0:t1].copy_(p)
    return lp, lse


token_torch.register_fake(_fake_token)


# ------------------------------------------------------------------------------------ C++

_CPU_FAKE_REGISTERED = []


def register_cpu_fake() -> None:
    """Register the fake implementation of ``varkernels::token_cpu`` (its schema comes from the
    extension: run by the loader right after loading it, see ``csrc_loader.on_load``)."""
    if not _CPU_FAKE_REGISTERED:
        register_fake("varkernels::token_cpu")(_fake_token)
        _CPU_FAKE_REGISTERED.append(True)


csrc_loader.on_load(register_cpu_fake)


def require_cpu_op(backend: str) -> None:
    """Load the C++ kernel (and register its fake) before ``backend="cpu"`` dispatches to it, so a
    direct caller of the core does not depend on a public op having loaded it first."""
    if backend == "cpu" and not cpu_extension_available():
        require_cpu_extension()  # raises RuntimeError naming the cause


# ------------------------------------------------------------------------------------ dispatch


def token_kernel(backend: str):
    """The registered token op of ``backend`` ("triton" | "cpu" | "torch", already resolved), looked up at
    the call (a test may stand in for it). Call it as ``token_kernel(backend)(x, labels, coef, grad, lse_in,
    softcap=..., inv_temperature=..., ignore_index=..., entropy=None)``: x [B, T, V]; labels [B·T] int64/int32
    contiguous; coef (``kernel_coef``), lse_in: [B·T] fp32 contiguous or None; grad: [B, T, V] written (may be x)
    or None; entropy: [B·T] fp32 contiguous written (not with lse_in) or None. Returns (lp [B·T] fp32, lse [B·T]
    fp32)."""
    if backend == "triton":
        load_triton_ops()
    return getattr(torch.ops.varkernels, "token_" + backend)
