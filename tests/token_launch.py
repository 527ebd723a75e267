"""``launch_token``: the token op's Triton launch with the kernel choice forcible, shared by
tests/test_single_pass.py, tests/test_compile.py and tests/test_traffic.py."""

from __future__ import annotations

import torch
from helpers import IGNORE_INDEX

from varkernels._backend import triton_interpret
from varkernels.core import _triton_kernels as K


def launch_token(x, labels, coef, grad, lse_in, *, softcap=None, temperature=1.0, ignore_index=IGNORE_INDEX,
                 kernel="auto", entropy=None):
    """``token_triton_launch`` of varkernels/core/token.py, with the kernel choice forcible.

    kernel: "auto" (the configuration table), "single" or "tiled" (forced, with the launch
    parameters the table gives that kernel). entropy: the optional [B·T] fp32 output (HAS_ENTROPY).
    Returns (lp [B·T] fp32, lse [B·T] fp32).
    """
    import triton

    B, T, V = x.shape
    N = B * T
    auto, block, num_warps = K.token_kernel_config(V, x.dtype, softcap=softcap)
    if kernel == "single":
        fn, block = K._token_kernel_single, triton.next_power_of_2(V)
        num_warps = min(32, max(4, block // 1024))  # the interpreter ignores it
    elif kernel == "tiled":
        fn, block, num_warps = K._token_kernel, min(triton.next_power_of_2(V), K.MAX_FUSED_SIZE), K.TOKEN_NUM_WARPS
    else:
        fn = auto
    lp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    gs = grad.stride() if grad is not None else (0, 0, 0)
    rne = grad is not None and grad.dtype == torch.bfloat16 and grad.device.type != "cuda" and triton_interpret()
    fn[(N,)](
        x_ptr=x, grad_ptr=grad, labels_ptr=labels, coef_ptr=coef, lse_in_ptr=lse_in,
        lp_ptr=lp, lse_ptr=lse,
        T=T, V=V,
        stride_xb=x.stride(0), stride_xt=x.stride(1), stride_xv=x.stride(2),
        stride_gb=gs[0], stride_gt=gs[1], stride_gv=gs[2],
        softcap=softcap, inv_temperature=1.0 / temperature, ignore_index=ignore_index,
        BLOCK_V=block, RNE_BF16=rne,
        HAS_GRAD=grad is not None, HAS_LSE_IN=lse_in is not None, HAS_SOFTCAP=softcap is not None,
        ent_ptr=entropy, HAS_ENTROPY=entropy is not None,
        num_warps=num_warps,
    )
    return lp, lse
