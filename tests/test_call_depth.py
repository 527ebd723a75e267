"""A public function reaches its kernel through few varkernels frames (docs/design.md §3.4: public function →
preparation → autograd → driver → kernels). Counted on the stack when the C++ token op is called, by standing a
recorder in for ``torch.ops.varkernels.token_cpu`` (the driver looks the operator up at each call)."""

import inspect
import os

import pytest
import torch
from helpers import require_backend

import varkernels

ROOT = os.path.dirname(varkernels.__file__)


def _frames_at_the_cpu_op(monkeypatch, call) -> list:
    ns = torch.ops.varkernels
    real = ns.token_cpu
    seen = []

    def recorder(*args, **kwargs):
        seen.append([f"{os.path.relpath(f.filename, ROOT)}:{f.function}" for f in inspect.stack()[1:]
                     if f.filename.startswith(ROOT)])
        return real(*args, **kwargs)

    monkeypatch.setattr(ns, "token_cpu", recorder)
    call()
    assert seen, "the C++ token op was not called"
    return seen[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_reaches_the_cpu_kernel_in_at_most_five_frames(monkeypatch, dtype):
    require_backend("cpu")
    h = torch.randn(2, 8, 32, dtype=dtype, requires_grad=True)
    W = torch.randn(64, 32, dtype=dtype, requires_grad=True)
    y, R, Q = torch.randint(0, 64, (2, 8)), torch.randn(2), -torch.rand(2)
    varkernels.fused_linear_var_loss(h, W, y, R, Q, backend="cpu")  # warm: the extension is loaded

    frames = _frames_at_the_cpu_op(
        monkeypatch, lambda: varkernels.fused_linear_var_loss(h, W, y, R, Q, backend="cpu").backward())
    assert len(frames) <= 5, frames
    assert frames[-1] == os.path.join("var", "loss.py") + ":fused_linear_var_loss"


def test_logits_loss_reaches_the_cpu_kernel_in_three_frames(monkeypatch):
    require_backend("cpu")
    x = torch.randn(2, 8, 64, requires_grad=True)
    y, R, Q = torch.randint(0, 64, (2, 8)), torch.randn(2), -torch.rand(2)
    varkernels.fused_var_loss(x, y, R, Q, backend="cpu")
    frames = _frames_at_the_cpu_op(monkeypatch, lambda: varkernels.fused_var_loss(x, y, R, Q, backend="cpu"))
    assert len(frames) <= 3, frames
