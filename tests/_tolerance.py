"""Tolerance policy of SPEC §4.1 for the fused-linear and log-prob tests:

    max |kernel − truth| <= 2 · max |torch_same_dtype − truth| + atol,   atol = 1e-6 · max |truth|

``truth`` is the reference in float64; ``torch_same_dtype`` is the same reference run on the
inputs in the kernel's dtype (what a user writing it in PyTorch would get).
"""

import torch


def check_against_truth(name, out, truth, torch_out, factor=2.0, rel_atol=1e-6):
    out, truth, torch_out = (t.detach().double() for t in (out, truth, torch_out))
    err = (out - truth).abs()
    ref_err = (torch_out - truth).abs().max().item()
    scale = truth.abs().max().item()
    bound = factor * ref_err + rel_atol * max(scale, 1e-30)
    worst = err.max().item()
    if not worst <= bound:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{name}: max abs err {worst:.3e} > bound {bound:.3e} (torch err {ref_err:.3e}, "
            f"|truth| max {scale:.3e}, rel err {worst / max(scale, 1e-30):.3e}) at index {idx}: "
            f"kernel {out[idx].item():.6e} truth {truth[idx].item():.6e}"
        )
