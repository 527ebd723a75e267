"""sequence_logps (generic log-prob mode) against the reference."""

import pytest
import torch
from helpers import assert_close, require_backend

from varkernels import sequence_logps
from varkernels.reference import sequence_logps_reference

# The reduction is applied to the kernel's token log-probs in PyTorch (varkernels/logps.py:
# reduce_token_logps), the same for every dtype: every reduction in fp32, one each in bf16 and fp16.
CASES = [(torch.float32, r) for r in ("mean", "sum", "none")] + [(torch.bfloat16, "mean"), (torch.float16, "none")]


@pytest.mark.parametrize("backend", ["triton", "torch", "cpu"])
@pytest.mark.parametrize("dtype,reduction", CASES, ids=[f"{str(d)[6:]}-{r}" for d, r in CASES])
def test_sequence_logps_parity(backend, dtype, reduction):
    require_backend(backend)
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 1000
    x = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[2] = -100
    kw = dict(reduction=reduction, softcap=5.0, shift_labels=True)

    def run(fn, dt, **extra):
        xx = x.detach().to(dt).clone().requires_grad_()
        out = fn(xx, y, **kw, **extra)
        probe = torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)
        (out * probe).sum().backward()
        return out, xx.grad

    truth, tg = run(sequence_logps_reference, torch.float64)
    same, sg = run(sequence_logps_reference, dtype)
    out, og = run(sequence_logps, dtype, backend=backend)
    assert out.dtype == torch.float32 and og.dtype == dtype
    assert_close(out, same, truth, name="logps")
    assert_close(og, sg, tg, name="grad")
    if reduction != "none":
        assert out[2].item() == 0.0 and torch.all(og[2] == 0)  # all-ignored row: 0, no gradient


def test_sequence_logps_no_grad_saves_nothing():
    x = torch.randn(2, 4, 30, requires_grad=True)
    y = torch.randint(0, 30, (2, 4))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = sequence_logps(x, y, backend="torch")
        assert out.grad_fn is None and packed == []
