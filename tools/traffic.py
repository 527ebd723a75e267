"""Memory-traffic counters (docs/design.md §4.3): bytes that Triton kernels and aten ops read and write.

Two counters, both used as context managers:

* ``count_triton_traffic()`` hooks the Triton interpreter (``TRITON_INTERPRET=1`` set before
  triton is imported): every load and store a kernel program issues is counted as
  (number of unmasked lanes) × (element size), per kernel. Lanes switched off by a mask are not
  counted — on a GPU they issue no memory transaction. Repeated accesses to one address are
  counted each time: this is traffic to the memory system, an upper bound of DRAM traffic
  (a cache may serve repeats), and exactly what a kernel with no reuse moves.

* ``count_aten_traffic()`` is a ``TorchDispatchMode`` that adds, for every aten op, the bytes of
  its tensor inputs and outputs — the naive measure of eager PyTorch (each op reads its inputs
  from memory and writes its outputs). Views and allocations move nothing and count zero; a
  broadcast (stride-0) input counts its distinct elements once. Index ops count their whole
  inputs (``gather`` of B·T targets from [B, T, V] log-probs counts the [B, T, V] read): an
  over-count of what they touch, one of the nine passes counted for the naive VAR loss in fp32.
  Ops issued by the Triton interpreter itself (its host copies of kernel arguments) are not counted.

    with count_triton_traffic() as tt, count_aten_traffic() as at:
        fused_var_loss(logits, ..., backend="triton").backward()
    tt.total, tt.by_kernel, at.total           # bytes

Both count bytes, not time. A time derived from them (bytes / bandwidth) is a roofline ESTIMATE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import defaultdict

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["AtenTraffic", "TritonTraffic", "count_aten_traffic", "count_triton_traffic", "tensor_bytes"]


# ----------------------------------------------------------------------------------------------
# which interpreted kernel is running


_state = threading.local()
_tracking = {"depth": 0, "original_run": None, "on_launch": []}


def _kernel_stack() -> list:
    if not hasattr(_state, "kernels"):
        _state.kernels = []
    return _state.kernels


def current_kernel():
    """Name of the interpreted Triton kernel running in this thread, or None."""
    stack = _kernel_stack()
    return stack[-1] if stack else None


@contextlib.contextmanager
def _track_kernels(on_launch=None):
    """Wrap ``InterpretedFunction.run`` (the launch of an interpreted kernel) to record its name
    while it runs and to call ``on_launch(name)``; nestable."""
    from triton.runtime.interpreter import InterpretedFunction

    if _tracking["depth"] == 0:
        original = InterpretedFunction.run

        def run(self, *args, **kwargs):
            name = self.fn.__name__
            for callback in _tracking["on_launch"]:
                callback(name)
            stack = _kernel_stack()
            stack.append(name)
            try:
                return original(self, *args, **kwargs)
            finally:
                stack.pop()

        _tracking["original_run"] = original
        InterpretedFunction.run = run
    _tracking["depth"] += 1
    if on_launch is not None:
        _tracking["on_launch"].append(on_launch)
    try:
        yield
    finally:
        if on_launch is not None:
            _tracking["on_launch"].remove(on_launch)
        _tracking["depth"] -= 1
        if _tracking["depth"] == 0:
            InterpretedFunction.run = _tracking["original_run"]
            _tracking["original_run"] = None


# ----------------------------------------------------------------------------------------------
# Triton interpreter loads and stores


@dataclasses.dataclass
class TritonTraffic:
    """Bytes loaded / stored by interpreted Triton kernels, in total and per kernel name."""

    loads: int = 0
    stores: int = 0
    by_kernel: dict = dataclasses.field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    launches: dict = dataclasses.field(default_factory=lambda: defaultdict(int))

    @property
    def total(self) -> int:
        return self.loads + self.stores

    def kernel_total(self, name: str) -> int:
        return sum(self.by_kernel.get(name, (0, 0)))

    def add(self, kind: int, nbytes: int) -> None:
        if kind == 0:
            self.loads += nbytes
        else:
            self.stores += nbytes
        self.by_kernel[current_kernel() or "<outside a kernel>"][kind] += nbytes

    def summary(self) -> str:
        rows = [f"{name}: loads {ld:,} B, stores {st:,} B ({self.launches.get(name, 0)} launches)"
                for name, (ld, st) in sorted(self.by_kernel.items())]
        return "\n".join(rows + [f"total: {self.total:,} B"])


def _element_bytes(ptrs) -> int:
    bits = ptrs.get_element_ty().primitive_bitwidth
    return max(1, bits // 8)  # int1 is stored as a byte


def _active_lanes(ptrs, mask) -> int:
    if mask is None:
        return int(np.size(ptrs.data))
    return int(np.count_nonzero(np.broadcast_to(mask.data, np.shape(ptrs.data))))


# InterpreterBuilder method → (counted as load (0) / store (1), (pointers, mask) from its arguments)
_MEMORY_OPS = {
    "create_load": ((0,), lambda a: (a[0], None)),  # (ptrs, cache_policy, is_volatile)
    "create_masked_load": ((0,), lambda a: (a[0], a[1])),  # (ptrs, mask, other, cache_policy, is_volatile)
    "create_store": ((1,), lambda a: (a[0], None)),  # (ptrs, value, cache_policy)
    "create_masked_store": ((1,), lambda a: (a[0], a[2])),  # (ptrs, value, mask, cache_policy)
    "create_atomic_rmw": ((0, 1), lambda a: (a[1], a[3])),  # (rmwOp, ptr, val, mask, sem, scope)
    "create_atomic_cas": ((0, 1), lambda a: (a[0], None)),  # (ptr, cmp, val, sem, scope)
}


@contextlib.contextmanager
def count_triton_traffic():
    """Count the bytes interpreted Triton kernels load and store while the block runs.

    Hooks ``InterpreterBuilder.create_load / create_masked_load / create_store /
    create_masked_store`` and the atomics (a read and a write of each active lane). In triton 3.9
    the unmasked forms call the masked ones; only the outermost hooked call counts, so nothing
    is counted twice. Yields a ``TritonTraffic``.
    """
    import triton
    from triton.runtime.interpreter import InterpreterBuilder

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("count_triton_traffic needs the Triton interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    traffic = TritonTraffic()
    depth = threading.local()

    def counting(original, kinds, operands):
        def wrapper(self, *args, **kwargs):
            outer = getattr(depth, "n", 0) == 0
            depth.n = getattr(depth, "n", 0) + 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth.n -= 1
            if outer:
                ptrs, mask = operands(args)
                nbytes = _active_lanes(ptrs, mask) * _element_bytes(ptrs)
                for kind in kinds:
                    traffic.add(kind, nbytes)
            return result

        return wrapper

    originals = {name: getattr(InterpreterBuilder, name) for name in _MEMORY_OPS}
    try:
        for name, (kinds, operands) in _MEMORY_OPS.items():
            setattr(InterpreterBuilder, name, counting(originals[name], kinds, operands))
        with _track_kernels(on_launch=lambda name: traffic.launches.__setitem__(name, traffic.launches[name] + 1)):
            yield traffic
    finally:
        for name, original in originals.items():
            setattr(InterpreterBuilder, name, original)


# ----------------------------------------------------------------------------------------------
# aten ops


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 dimensions counted once)."""
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return n * t.element_size() if t.numel() else 0


_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_"}


class AtenTraffic(TorchDispatchMode):
    """TorchDispatchMode adding the bytes of every aten op's tensor inputs and outputs.

    ``total`` = Σ over ops of (bytes in + bytes out); ``by_op`` splits it per op name.
    """

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.writes = 0
        self.by_op = defaultdict(int)

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if current_kernel() is not None:  # the interpreter's own host copies of kernel arguments
            return out
        name = func.overloadpacket.__name__
        if func.is_view or name in _ALLOCATIONS:
            return out
        if func.namespace == "varkernels":  # a registered kernel: its bytes are counted by count_triton_traffic
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        r = sum(tensor_bytes(t) for t in ins)
        w = sum(tensor_bytes(t) for t in outs)
        self.reads += r
        self.writes += w
        self.by_op[name] += r + w
        return out

    def summary(self, top: int = 12) -> str:
        rows = sorted(self.by_op.items(), key=lambda kv: -kv[1])[:top]
        return "\n".join([f"{name}: {n:,} B" for name, n in rows] + [f"total: {self.total:,} B"])


@contextlib.contextmanager
def count_aten_traffic():
    """Count the bytes in + out of every aten op while the block runs (autograd's backward ops
    included). Yields an ``AtenTraffic``."""
    with _track_kernels(), AtenTraffic() as mode:
        yield mode
