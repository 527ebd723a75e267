"""A small cache of already-touched CPU gradient buffers for the logits-form loss.

Why: the logits form writes its gradient into a fresh [B, T, V] buffer on every call. A fresh
buffer of that size is mmap-ed by the C library and every 4 KiB page of it faults on its first
write: at B=8, T=512, V=32000 fp32 (500 MiB) that is ~140-150 ms on this project's 2-core machine,
more than the whole loss takes (``benchmarks/bench_grad_buffers.py``). Transparent huge pages
would cut the faults but make the time depend on the machine's memory state (with ``defrag =
madvise`` a fragmented machine stalls for hundreds of milliseconds on compaction). Instead, as
the CUDA caching allocator does for device memory, a gradient buffer whose tensor is freed (the
training loop's ``zero_grad(set_to_none=True)``, or the next step dropping the old ``.grad``)
goes back to a bounded cache, and the next loss of the same size gets it back already faulted in.

Contract:

* :func:`grad_buffer_like` (x) returns an uninitialised contiguous tensor of x's shape and dtype,
  like ``torch.empty_like(x)``. From the cache only for a contiguous CPU tensor of at least
  ``MIN_BYTES``, in eager mode; otherwise ``torch.empty_like`` itself.
* A buffer is handed out to one tensor at a time: it returns to the cache only when the storage of
  that tensor dies (every view of it included), so two gradients alive at once never share memory.
* The cache keeps at most ``max_bytes`` of free buffers (default 2 GiB, env
  ``VARKERNELS_GRAD_CACHE_MAX_BYTES``), oldest dropped first; a buffer larger than twice the request is
  not used for it. Nothing process-wide changes: no malloc settings, no PyTorch allocator hooks, no
  madvise; the buffers are ordinary tensors the cache holds.
* ``release_grad_buffers()`` frees every cached buffer (returns the bytes freed);
  ``set_grad_buffer_cache(False)`` (or ``VARKERNELS_GRAD_CACHE=0`` in the environment) turns the
  cache off: buffers then come from ``torch.empty_like`` and freed ones are not kept.
  ``grad_buffer_stats()`` reports what it holds.

How a freed buffer is noticed: the handed-out tensor is ``torch.frombuffer`` over a NumPy view of
the cached block, so the tensor's storage holds the only reference to that view; a
``weakref.finalize`` on the view puts the block back when the storage is freed. Blocks come back
through a deque (append is atomic), never under a lock: a finalizer can run inside any allocation.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref

import torch

MIN_BYTES = 1 << 20  # below this the C library reuses heap pages: no first-touch faults to save
DEFAULT_MAX_BYTES = 2 << 30

_enabled = os.environ.get("VARKERNELS_GRAD_CACHE", "1") not in ("0", "false", "False", "off")
_max_bytes = int(os.environ.get("VARKERNELS_GRAD_CACHE_MAX_BYTES", DEFAULT_MAX_BYTES))
_free: list = []  # uint8 CPU tensors (blocks), oldest first
_returned: collections.deque = collections.deque()  # blocks whose tensor died since the last call
_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}

try:
    import numpy  # noqa: F401  (torch's CPU build ships with it; without it the cache is off)

    _HAVE_NUMPY = True
except ImportError:  # pragma: no cover
    _HAVE_NUMPY = False


def _give_back(block: torch.Tensor) -> None:
    if _enabled:
        _returned.append(block)


def _drain_returned() -> None:
    """Move returned blocks to the free list, dropping the oldest beyond ``_max_bytes`` (lock held)."""
    while _returned:
        block = _returned.popleft()
        if block.numel() <= _max_bytes:
            _free.append(block)
    total = sum(b.numel() for b in _free)
    while _free and total > _max_bytes:
        total -= _free.pop(0).numel()


def _lease(block: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like x over the first bytes of ``block``; block returns when its storage dies."""
    view = block.numpy()  # a NumPy array over the block (its base holds the block)
    out = torch.frombuffer(view, dtype=x.dtype, count=x.numel()).view(x.shape)
    fin = weakref.finalize(view, _give_back, block)
    fin.atexit = False
    return out


def grad_buffer_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised gradient buffer with the shape and dtype of x (``torch.empty_like(x)`` when
    the cache does not apply); see the module docstring."""
    nbytes = x.numel() * x.element_size()
    if (not _enabled or not _HAVE_NUMPY or x.device.type != "cpu" or nbytes < MIN_BYTES
            or not x.is_contiguous() or torch.compiler.is_compiling() or type(x) is not torch.Tensor
            or x.layout != torch.strided or x.dtype not in _NUMPY_SAFE):
        return torch.empty_like(x)
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(x):
        return torch.empty_like(x)
    with _lock:
        _drain_returned()
        fits = [i for i, b in enumerate(_free) if nbytes <= b.numel() <= 2 * nbytes]
        if fits:
            block = _free.pop(min(fits, key=lambda i: _free[i].numel()))
            _stats["hits"] += 1
        else:
            block = None
            _stats["misses"] += 1
    if block is None:
        block = torch.empty(nbytes, dtype=torch.uint8)
    return _lease(block, x)


# dtypes torch.frombuffer can view a byte buffer as (every float dtype the kernels write)
_NUMPY_SAFE = {torch.float32, torch.float64, torch.bfloat16, torch.float16}


def release_grad_buffers() -> int:
    """Free every cached gradient buffer now; returns the number of bytes released. Buffers that back
    a live gradient are not touched (they return to the cache when that gradient is freed)."""
    with _lock:
        _drain_returned()
        freed = sum(b.numel() for b in _free)
        _free.clear()
    return freed


def set_grad_buffer_cache(enabled: bool | None = None, max_bytes: int | None = None) -> dict:
    """Turn the gradient-buffer cache on or off and/or set the most bytes of free buffers it keeps.

    Turning it off releases what it holds. Returns the previous settings ``{"enabled", "max_bytes"}``
    (so that ``set_grad_buffer_cache(**old)`` restores them)."""
    global _enabled, _max_bytes
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_grad_buffer_cache: enabled must be a bool or None, got {type(enabled).__name__}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
        raise ValueError(f"set_grad_buffer_cache: max_bytes must be an int >= 0 or None, got {max_bytes!r}")
    old = {"enabled": _enabled, "max_bytes": _max_bytes}
    with _lock:
        if enabled is not None:
            _enabled = enabled
        if max_bytes is not None:
            _max_bytes = max_bytes
        _drain_returned()
    if not _enabled:
        release_grad_buffers()
    return old


def grad_buffer_stats() -> dict:
    """``{"enabled", "max_bytes", "cached_bytes", "cached_buffers", "hits", "misses"}``."""
    with _lock:
        _drain_returned()
        return {"enabled": _enabled, "max_bytes": _max_bytes, "cached_bytes": sum(b.numel() for b in _free),
                "cached_buffers": len(_free), **_stats}
