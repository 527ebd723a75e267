"""The CPU gradient-buffer cache of the logits-form loss (varkernels/core/_grad_buffers.py): reused
buffers give correct gradients, two live gradients never share memory, release frees, the switch
turns it off."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import assert_close, make_labels, make_pairs, require_backend

import varkernels
from varkernels.core import _grad_buffers
from varkernels.reference import var_loss_reference

B, T, V = 2, 16, 16384  # 2 MiB of fp32 logits: above the cache's 1 MiB threshold


@pytest.fixture(autouse=True)
def fresh_cache():
    old = varkernels.set_grad_buffer_cache(True, _grad_buffers.DEFAULT_MAX_BYTES)
    varkernels.release_grad_buffers()
    yield
    varkernels.release_grad_buffers()
    varkernels.set_grad_buffer_cache(**old)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    labels = make_labels(B, T, V, generator=g)
    R, Q = make_pairs(labels)
    return logits, labels, R, Q


def _reference_grad(logits, labels, R, Q, dtype):
    x = logits.detach().to(dtype).clone().requires_grad_()
    var_loss_reference(x, labels, R.to(dtype), Q.to(dtype)).backward()
    return x.grad


def _assert_grad(grad, logits, labels, R, Q):
    """The tolerance policy (helpers.assert_close): the fp32 reference is the yardstick, float64 the truth."""
    ref, truth = (_reference_grad(logits, labels, R, Q, dtype) for dtype in (torch.float32, torch.float64))
    assert_close(grad, ref, truth, name="logits grad")


def _storage_span(t):
    lo = t.untyped_storage().data_ptr()
    return lo, lo + t.untyped_storage().nbytes()


def _disjoint(a, b):
    (a0, a1), (b0, b1) = _storage_span(a), _storage_span(b)
    return a1 <= b0 or b1 <= a0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_reused_buffer_gives_correct_gradients(backend):
    """A freed gradient's buffer comes back (a cache hit) holding the old gradient's values; the next
    loss must overwrite every element, ignored rows included (their gradient is 0)."""
    require_backend(backend)
    logits, labels, R, Q = _inputs(0)
    varkernels.fused_var_loss(logits, labels, R, Q, backend=backend).backward()
    first_ptr = logits.grad.data_ptr()
    _assert_grad(logits.grad, logits, labels, R, Q)
    logits.grad.fill_(123.0)  # poison the buffer before it goes back
    logits.grad = None
    gc.collect()
    assert varkernels.grad_buffer_stats()["cached_buffers"] == 1
    hits = varkernels.grad_buffer_stats()["hits"]
    logits2, labels2, R2, Q2 = _inputs(1)
    labels2[0, :] = -100  # a whole ignored row: the kernel must still write its zeros
    varkernels.fused_var_loss(logits2, labels2, R2, Q2, backend=backend).backward()
    assert varkernels.grad_buffer_stats()["hits"] == hits + 1
    assert logits2.grad.data_ptr() == first_ptr  # the same memory, reused
    _assert_grad(logits2.grad, logits2, labels2, R2, Q2)
    assert (logits2.grad[0] == 0).all()


def test_two_live_gradients_never_share_memory():
    """Two losses whose gradients are both alive get disjoint buffers, and a gradient that is alive only
    through a view of it keeps its buffer out of the cache."""
    a, labels_a, Ra, Qa = _inputs(2)
    b, labels_b, Rb, Qb = _inputs(3)
    varkernels.fused_var_loss(a, labels_a, Ra, Qa).backward()
    a.grad = None  # the first buffer goes back to the cache ...
    gc.collect()
    varkernels.fused_var_loss(a, labels_a, Ra, Qa).backward()  # ... and is taken again here
    varkernels.fused_var_loss(b, labels_b, Rb, Qb).backward()
    assert _disjoint(a.grad, b.grad)
    _assert_grad(a.grad, a, labels_a, Ra, Qa)
    _assert_grad(b.grad, b, labels_b, Rb, Qb)

    view = b.grad[1]  # b's gradient stays alive through this view only
    kept = view.clone()
    b.grad = None
    gc.collect()
    c, labels_c, Rc, Qc = _inputs(4)
    varkernels.fused_var_loss(c, labels_c, Rc, Qc).backward()
    assert _disjoint(view, c.grad) and _disjoint(a.grad, c.grad)
    torch.testing.assert_close(view, kept, rtol=0, atol=0)


def test_release_frees_the_cached_buffers():
    logits, labels, R, Q = _inputs(5)
    varkernels.fused_var_loss(logits, labels, R, Q).backward()
    live = varkernels.release_grad_buffers()
    assert live == 0  # the only buffer backs a live gradient: nothing to free
    nbytes = logits.grad.numel() * logits.grad.element_size()
    logits.grad = None
    gc.collect()
    assert varkernels.grad_buffer_stats()["cached_bytes"] == nbytes
    assert varkernels.release_grad_buffers() == nbytes
    stats = varkernels.grad_buffer_stats()
    assert stats["cached_bytes"] == 0 and stats["cached_buffers"] == 0


def test_the_switch_turns_the_cache_off():
    varkernels.set_grad_buffer_cache(False)
    logits, labels, R, Q = _inputs(6)
    before = varkernels.grad_buffer_stats()
    for _ in range(2):
        varkernels.fused_var_loss(logits, labels, R, Q).backward()
        _assert_grad(logits.grad, logits, labels, R, Q)
        logits.grad = None
        gc.collect()
    after = varkernels.grad_buffer_stats()
    assert not after["enabled"] and after["cached_bytes"] == 0
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])  # never consulted
    # switching off releases what the cache held
    varkernels.set_grad_buffer_cache(True)
    varkernels.fused_var_loss(logits, labels, R, Q).backward()
    logits.grad = None
    gc.collect()
    assert varkernels.grad_buffer_stats()["cached_bytes"] > 0
    varkernels.set_grad_buffer_cache(False)
    assert varkernels.grad_buffer_stats()["cached_bytes"] == 0


def test_the_cache_is_bounded_and_small_or_odd_tensors_bypass_it():
    nbytes = B * T * V * 4
    varkernels.set_grad_buffer_cache(max_bytes=nbytes - 1)  # smaller than one buffer: nothing kept
    logits, labels, R, Q = _inputs(7)
    varkernels.fused_var_loss(logits, labels, R, Q).backward()
    logits.grad = None
    gc.collect()
    assert varkernels.grad_buffer_stats()["cached_bytes"] == 0
    small = torch.randn(2, 3, 5)
    misses = varkernels.grad_buffer_stats()["misses"]
    assert _grad_buffers.grad_buffer_like(small).shape == small.shape
    assert _grad_buffers.grad_buffer_like(logits.detach().transpose(0, 1)).shape == (T, B, V)
    assert varkernels.grad_buffer_stats()["misses"] == misses  # neither went through the cache


def test_set_grad_buffer_cache_checks_its_arguments():
    with pytest.raises(TypeError, match="enabled"):
        varkernels.set_grad_buffer_cache(enabled=1)
    with pytest.raises(ValueError, match="max_bytes"):
        varkernels.set_grad_buffer_cache(max_bytes=-1)
