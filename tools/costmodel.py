"""A GPU cost model traced from the real code: roofline ESTIMATES of time and peak memory.

No GPU is used and nothing here is a measured time. A provider's CUDA code path runs on fake CUDA
tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and devices, no data)
under :class:`CostTracer`, a ``TorchDispatchMode`` that records every op it issues:

* aten ops: input/output dtypes and shapes, FLOPs from ``torch.utils.flop_counter``'s registered
  formulas (mm, addmm, bmm, baddbmm, ...; other ops count 0 FLOPs: they are bandwidth-bound) and
  bytes = tensor inputs + outputs (views and allocations move nothing; an ``out=`` tensor and the
  destination of ``copy_`` / ``zero_`` / ``fill_`` are written, not read);
* custom kernels (``torch.ops.varkernels.*``): the traffic they declare in :data:`KERNEL_TRAFFIC`
  (a kernel's loads and stores are not visible to the tracer, so each states its algorithm);
* memory: every storage an op creates is live from its creation until the storage is freed (a
  ``weakref.finalize`` on the fake storage); the peak of the live bytes, minus the bytes of the
  gradients the provider returns, is its peak memory beyond inputs and returned gradients.

Providers whose kernels cannot run on fake tensors are described op by op from their published
algorithm with :class:`CountedTrace` (the same records, marked "counted").

The roofline of one op on a :class:`GPU` is ``max(FLOPs / peak(dtype class), bytes / DRAM
bandwidth)``; a trace's estimate is the sum over its ops (no overlap between ops, no launch
latency, peak rates: a lower bound of the real time). GEMMs count at the peak of their input
dtype: bf16/fp16 tensor cores, and fp32 inputs at the fp32 (non-tensor-core) rate unless TF32 is
explicitly assumed (``tf32=True``); PyTorch's default ``torch.backends.cuda.matmul.allow_tf32`` is
False, so the default here is fp32.

    with FakeTensorMode():
        hidden, weight, labels, coef = ...                    # fake CUDA tensors
        trace = trace_call(lambda: fn(hidden, weight, ...), returned=lambda out: out[2:4])
    trace.estimate_seconds(H100_SXM), trace.peak_extra_bytes
"""

from __future__ import annotations

import dataclasses
import math
import unittest.mock
import weakref
from typing import Callable, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "A100_PCIE", "A100_SXM", "Assumptions", "CostTracer", "CountedTrace", "GPU", "GPUS", "H100_SXM", "H200_SXM",
    "KERNEL_TRAFFIC", "OpRecord", "Trace", "dtype_class", "fake_cuda_shim", "gemm_record", "gpu_for_device_name",
    "measured_gpu", "roofline_seconds", "three_gemms", "trace_call", "varkernels_linear", "varkernels_logits",
]


# ----------------------------------------------------------------------------------------------
# GPUs


@dataclasses.dataclass(frozen=True)
class GPU:
    """Peak dense rates (FLOP/s) per dtype class and peak DRAM bandwidth (bytes/s) of one GPU."""

    name: str
    peak_flops: dict
    dram_bytes_per_s: float
    source: str


H100_SXM = GPU(
    "H100 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}, 3.35e12,
    "NVIDIA H100 Tensor Core GPU datasheet, SXM column, dense (the sparsity figures are 2x): BF16/FP16 "
    "tensor core 989.4 TFLOPS, TF32 tensor core 494.7 TFLOPS, FP32 66.9 TFLOPS, HBM3 3.35 TB/s",
)
A100_SXM = GPU(
    "A100 SXM", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 2.0e12,
    "NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column, dense: BF16/FP16 tensor core 312 TFLOPS, "
    "TF32 tensor core 156 TFLOPS, FP32 19.5 TFLOPS, HBM2e 2,039 GB/s (taken as 2.0 TB/s)",
)
A100_PCIE = GPU(
    "A100 PCIe", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, 1.935e12,
    "NVIDIA A100 Tensor Core GPU datasheet, 80GB PCIe column, dense: BF16/FP16 tensor core 312 TFLOPS, "
    "TF32 tensor core 156 TFLOPS, FP32 19.5 TFLOPS, HBM2e 1,935 GB/s (the GPU of Liger-Kernel's A100 benchmark CSV)",
)
# H200: the H100's GH100 die with HBM3e, so the same dense tensor-core rates and more bandwidth. Datasheet figures
# (NVIDIA H200 Tensor Core GPU datasheet, SXM column; the sparsity figures there are twice the dense ones):
# 141 GB HBM3e, 4.8 TB/s, BF16/FP16 tensor core 1,979 TFLOPS with sparsity = ~989 dense, TF32 ~495 dense, FP32 67.
# Checked against third-party copies of the datasheet figures (the vendor page itself is not in the search corpora):
# https://itkb.uw.cz/2026/06/nvidia-h200-vs-b300-precisions-cores.html ("dense mode": FP16/BF16 ~989 TFLOPS,
# 4.8 TB/s, 141 GB) and https://aiwiki.ai/wiki/nvidia_h200 (141 GB at 4.8 TB/s). Measured rates are lower
# (PyTorch 8192^3 bf16 GEMM ~770-800 TFLOP/s, device copy ~4.3 TB/s): the GPU suite calibrates them on the device
# (measured_gpu below).
H200_SXM = GPU(
    "H200 SXM", {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}, 4.8e12,
    "NVIDIA H200 Tensor Core GPU datasheet, SXM column, dense (the sparsity figures are 2x): BF16/FP16 tensor core "
    "~989 TFLOPS, TF32 ~495 TFLOPS, FP32 67 TFLOPS, 141 GB HBM3e at 4.8 TB/s",
)
GPUS = {"h100": H100_SXM, "a100": A100_SXM, "a100_pcie": A100_PCIE, "h200": H200_SXM}


def gpu_for_device_name(name: str) -> Optional[GPU]:
    """The datasheet entry of a CUDA device name (``torch.cuda.get_device_name()``), or None if unknown.
    "NVIDIA H200" -> H200_SXM, "NVIDIA H100 80GB HBM3" -> H100_SXM, "NVIDIA A100-SXM4-80GB" -> A100_SXM,
    "NVIDIA A100 80GB PCIe" -> A100_PCIE."""
    n = name.upper()
    if "H200" in n:
        return H200_SXM
    if "H100" in n:
        return H100_SXM
    if "A100" in n:
        return A100_PCIE if "PCIE" in n else A100_SXM
    return None


def measured_gpu(base: GPU, bf16_flops: float, dram_bytes_per_s: float, name: Optional[str] = None) -> GPU:
    """A :class:`GPU` with the rates measured on the device (a large bf16 GEMM, a device copy): bf16/fp16 at the
    measured GEMM rate, tf32/fp32 scaled from ``base``'s datasheet by the same measured/datasheet ratio, DRAM at
    the measured copy bandwidth. Roofline estimates against it are against this device, not its datasheet."""
    ratio = bf16_flops / base.peak_flops["bf16"]
    flops = {k: (bf16_flops if k in ("bf16", "fp16") else v * ratio) for k, v in base.peak_flops.items()}
    return GPU(name or f"{base.name} (measured)", flops, dram_bytes_per_s,
               f"measured on the device: bf16 GEMM {bf16_flops / 1e12:.0f} TFLOP/s, device copy "
               f"{dram_bytes_per_s / 1e12:.2f} TB/s (tf32/fp32 scaled from {base.name}'s datasheet by the same ratio)")


def dtype_class(dtype: torch.dtype, tf32: bool = False) -> str:
    """Peak-rate class of a GEMM whose inputs have ``dtype``."""
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    return "fp32"


def roofline_seconds(flops: float, nbytes: float, flop_class: Optional[str], gpu: GPU) -> float:
    """max(FLOPs / peak of the class, bytes / DRAM bandwidth): an ESTIMATE, a lower bound."""
    compute = flops / gpu.peak_flops[flop_class or "fp32"] if flops else 0.0
    return max(compute, nbytes / gpu.dram_bytes_per_s)


# ----------------------------------------------------------------------------------------------
# records


@dataclasses.dataclass
class OpRecord:
    """One op of a trace. ``how`` is "traced" (aten op seen by the tracer), "kernel" (a custom kernel
    seen by the tracer, its bytes declared in KERNEL_TRAFFIC) or "counted" (from a published algorithm)."""

    name: str
    how: str
    in_dtypes: tuple = ()
    out_dtypes: tuple = ()
    shapes: str = ""
    flops: float = 0.0
    flop_class: Optional[str] = None
    reads: int = 0
    writes: int = 0
    note: str = ""

    @property
    def nbytes(self) -> int:
        return self.reads + self.writes

    @property
    def is_gemm(self) -> bool:
        return self.flops > 0

    def seconds(self, gpu: GPU) -> float:
        return roofline_seconds(self.flops, self.nbytes, self.flop_class, gpu)


@dataclasses.dataclass
class Trace:
    """The ops of one provider call and its memory: ``peak_bytes`` (live bytes created during the call,
    at their maximum), ``returned_bytes`` (the gradients it returns, alive at the end)."""

    ops: list = dataclasses.field(default_factory=list)
    peak_bytes: int = 0
    returned_bytes: int = 0
    method: str = "traced"
    at_peak: list = dataclasses.field(default_factory=list)  # (nbytes, shape, dtype) live at the peak

    @property
    def peak_extra_bytes(self) -> int:
        """Peak memory beyond the inputs (created before the call) and the returned gradients."""
        return self.peak_bytes - self.returned_bytes

    @property
    def flops(self) -> float:
        return sum(r.flops for r in self.ops)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.ops)

    def gemms(self) -> list:
        return [r for r in self.ops if r.is_gemm]

    def estimate_seconds(self, gpu: GPU) -> float:
        """Sum of the per-op rooflines: an ESTIMATE (lower bound), not a measured time."""
        return sum(r.seconds(gpu) for r in self.ops)

    def breakdown(self, gpu: GPU, top: int = 4) -> list:
        """[(op name, seconds)] of the costliest op names, summed over their calls."""
        by = {}
        for r in self.ops:
            by[r.name] = by.get(r.name, 0.0) + r.seconds(gpu)
        return sorted(by.items(), key=lambda kv: -kv[1])[:top]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 dimensions counted once)."""
    if not t.numel():
        return 0
    n = math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.dim() else 1
    return n * t.element_size()


def gemm_record(m: int, n: int, k: int, in_dtype: torch.dtype, out_dtype: torch.dtype, *, name: str = "mm",
                accumulate: bool = False, tf32: bool = False, how: str = "counted", note: str = "") -> OpRecord:
    """[m, k] @ [k, n] -> [m, n]: 2·m·n·k FLOPs, reads both operands (and C when accumulating), writes C."""
    ei, eo = in_dtype.itemsize, out_dtype.itemsize
    reads = (m * k + k * n) * ei + (m * n * eo if accumulate else 0)
    return OpRecord(name, how, (in_dtype, in_dtype), (out_dtype,), f"[{m},{k}]x[{k},{n}]", 2.0 * m * n * k,
                    dtype_class(in_dtype, tf32), reads, m * n * eo, note)


# ----------------------------------------------------------------------------------------------
# declared traffic of custom kernels


@dataclasses.dataclass
class Assumptions:
    """What the declared traffic depends on that fake tensors cannot tell.

    target_fraction: fraction of token rows with a target (the others are skipped by the kernels);
    unit_grad_output: the upstream gradient of the loss is exactly 1 (``loss.backward()``), so the
    scaling kernel returns at once; token_single_pass_max_v: largest V for which the token kernel
    reads each logit once; None (default): the launcher's own choice, ``token_kernel_config`` (the
    single-pass kernel for rows that fit on chip, else the tiled two-sweep one).
    """

    target_fraction: float = 1.0
    unit_grad_output: bool = True
    token_single_pass_max_v: Optional[int] = None


def _token_traffic(args, kwargs, a: Assumptions):
    """varkernels::token_triton(x, labels, coef, grad, lse_in, ...): per target row, the two-pass kernel
    reads the logits twice (logsumexp sweep, then the gradient sweep) and writes the gradient once;
    with lse_in (or a single-pass kernel) one read; without a gradient one read and no write."""
    x, labels, coef, grad, lse_in = args[:5]
    softcap = args[5] if len(args) > 5 else None
    B, T, V = x.shape
    rows = B * T * a.target_fraction
    row_bytes = V * x.element_size()
    has_grad = grad is not None
    if a.token_single_pass_max_v is None:
        from varkernels.core._triton_kernels import _token_kernel_single, token_kernel_config

        single_kernel = token_kernel_config(V, x.dtype, softcap=softcap)[0] is _token_kernel_single
    else:
        single_kernel = V <= a.token_single_pass_max_v
    single = lse_in is not None or not has_grad or single_kernel
    reads = rows * row_bytes * (1 if single else 2) + tensor_bytes(labels)
    reads += sum(tensor_bytes(t) for t in (coef, lse_in) if t is not None)
    writes = (rows * V * grad.element_size() if has_grad else 0) + 2 * 4 * B * T  # lp, lse fp32
    passes = "1 read" if single else "2 reads"
    return reads, writes, f"{passes} of the logits{' + 1 write of the gradient' if has_grad else ''}"


def _scale_traffic(args, kwargs, a: Assumptions):
    """varkernels::scale_triton(g, s): g *= s; returns at once (no g traffic) when s == 1."""
    g, s = args[:2]
    if a.unit_grad_output:
        return tensor_bytes(s), 0, "s == 1: returns at once"
    return tensor_bytes(g) + tensor_bytes(s), tensor_bytes(g), "read + write of g"


def _var_weights_traffic(args, kwargs, a: Assumptions):
    """varkernels::var_weights_triton(R, Q, ...): reads R and Q, writes w and log_z."""
    R, Q = args[:2]
    n = R.shape[0] * R.shape[1]
    return tensor_bytes(R) + tensor_bytes(Q), 2 * 4 * n, "R, Q -> w, log_z"


# op name (str(func.overloadpacket)) -> fn(args, kwargs, Assumptions) -> (reads, writes, note). Extend here
# when a kernel is added.
KERNEL_TRAFFIC = {
    "varkernels.token_triton": _token_traffic,
    "varkernels.scale_triton": _scale_traffic,
    "varkernels.var_weights_triton": _var_weights_traffic,
}


# ----------------------------------------------------------------------------------------------
# the tracer


_NO_TRAFFIC = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_", "detach",
    "lift_fresh", "_local_scalar_dense", "device", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
}
_WRITE_ONLY_SELF = {"copy_", "zero_", "fill_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
                    "new_zeros", "new_ones", "new_full", "scalar_tensor"}


_INDEXED = {"gather", "index_select", "index", "embedding", "index_add", "index_add_", "index_put", "index_put_",
            "scatter", "scatter_", "scatter_add", "scatter_add_", "index_copy_", "index_fill_"}


def _indexed_traffic(name: str, args, out):
    """(reads, writes, note) of an index op: the gathered / scattered elements and the index, not the whole
    tensor it indexes (``gather`` of B·T labels from [B, T, V] reads B·T elements)."""
    tensors = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
    index_bytes = sum(tensor_bytes(t) for t in tensors if not t.is_floating_point())
    if name in ("gather", "index_select", "index", "embedding"):
        o = tensor_bytes(out)
        return o + index_bytes, o, "touched elements"
    if name.startswith("index_fill"):
        return index_bytes, index_bytes * 0, "touched elements"
    src = [t for t in tensors[1:] if t.is_floating_point()]  # the source / values (self is tensors[0])
    moved = sum(tensor_bytes(t) for t in src)
    return 2 * moved + index_bytes, moved, "touched elements (read-modify-write)"


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class CostTracer(TorchDispatchMode):
    """Records every op (see the module docstring) and the live bytes of the storages ops create.

    ``inplace_accumulate``: an out-of-place ``addmm(acc, a, b, out_dtype=acc.dtype)`` whose result has
    acc's shape is recorded and returned as acc itself, as the real CUDA path writes ``out=acc`` (fake
    CUDA tensors of a CPU build cannot take that ``out=``): no second accumulator is counted.
    """

    def __init__(self, *, tf32: bool = False, assumptions: Optional[Assumptions] = None,
                 kernel_traffic: Optional[dict] = None, inplace_accumulate: bool = True):
        super().__init__()
        self.tf32 = tf32
        self.assumptions = assumptions or Assumptions()
        self.kernel_traffic = KERNEL_TRAFFIC if kernel_traffic is None else kernel_traffic
        self.inplace_accumulate = inplace_accumulate
        self.ops: list = []
        self.live: dict = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocations: list = []  # (shape, dtype, nbytes) of every storage created
        self.at_peak: list = []  # (nbytes, shape, dtype) of the storages live at the peak

    # memory -----------------------------------------------------------------------------------

    def _track(self, out, inputs) -> None:
        seen = {_storage_key(t) for t in inputs}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            s = t.untyped_storage()
            key = s._cdata
            if key in seen or key in self.live:
                continue
            nbytes = s.nbytes()
            self.live[key] = (nbytes, tuple(t.shape), t.dtype)
            self.live_bytes += nbytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                self.at_peak = list(self.live.values())
            self.allocations.append((tuple(t.shape), t.dtype, nbytes))
            weakref.finalize(s, self._free, key)

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, (0,))[0]
        self.live_bytes -= nbytes

    # ops --------------------------------------------------------------------------------------

    @staticmethod
    def _out_variant_fallback(func, args, kwargs, error):
        """An ``out=`` op whose fake kernel copies into a fake CUDA tensor (which a CPU build of torch
        cannot do): run its functional overload for the checks and return ``out`` itself (no data anyway)."""
        if "not linked with support for cuda" not in str(error) or "out" not in kwargs:
            raise error
        over = func._overloadname
        functional = {"out": "default", "dtype_out": "dtype"}.get(over, over.removesuffix("_out"))
        getattr(func.overloadpacket, functional)(*args, **{k: v for k, v in kwargs.items() if k != "out"})
        return kwargs["out"]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        full = str(func.overloadpacket)
        try:
            out = func(*args, **kwargs)
        except RuntimeError as e:
            out = self._out_variant_fallback(func, args, kwargs, e)
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        acc_inplace = (
            self.inplace_accumulate and name == "addmm" and func._overloadname == "dtype"
            and args[0].shape == out.shape and args[0].dtype == out.dtype
        )
        if acc_inplace:
            out = args[0]
        self._track(out, ins)
        if func.is_view or name in _NO_TRAFFIC or func.namespace == "prim":
            return out
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        rec = OpRecord(full, "traced", tuple(t.dtype for t in ins), tuple(t.dtype for t in outs),
                       " ".join(str(list(t.shape)) for t in ins[:3]))
        if full in self.kernel_traffic:
            reads, writes, note = self.kernel_traffic[full](args, kwargs, self.assumptions)
            rec.how, rec.reads, rec.writes, rec.note = "kernel", int(reads), int(writes), note
        else:
            out_kw = kwargs.get("out")
            out_keys = {id(t) for t in tree_flatten(out_kw)[0] if isinstance(t, torch.Tensor)}
            read_ins = [t for t in ins if id(t) not in out_keys]
            if name in _WRITE_ONLY_SELF and read_ins:
                read_ins = read_ins[1:] if name.endswith("_") else []
            rec.reads = sum(tensor_bytes(t) for t in read_ins)
            rec.writes = sum(tensor_bytes(t) for t in outs)
            if name in _INDEXED:  # touched elements only, not the whole indexed tensor
                rec.reads, rec.writes, rec.note = _indexed_traffic(name, args, out)
            if acc_inplace:
                rec.note = "out=acc on CUDA"
            from torch.utils.flop_counter import flop_registry

            formula = flop_registry.get(func.overloadpacket)
            if formula is None and name.endswith("_") and hasattr(torch.ops.aten, name[:-1]):
                formula = flop_registry.get(getattr(torch.ops.aten, name[:-1]))  # addmm_ costs as addmm
            if formula is not None:
                f_args = args
                if "dtype" in func._overloadname:  # mm.dtype / addmm.dtype: out_dtype is positional
                    f_args = tuple(a for a in args if isinstance(a, torch.Tensor))
                rec.flops = float(formula(*f_args, **kwargs, out_val=out))
                mats = [t for t in args if isinstance(t, torch.Tensor) and t.dim() >= 2]
                rec.flop_class = dtype_class(mats[-1].dtype if mats else torch.float32, self.tf32)
        self.ops.append(rec)
        return out


class fake_cuda_shim(TorchFunctionMode):
    """Routes the few Python-level tensor methods that fail on fake CUDA tensors of a CPU build of
    torch ("not linked with support for cuda devices": their bindings take a CUDA device guard) to the
    aten ops they issue: ``copy_`` and basic slicing / tensor indexing in ``__getitem__`` / ``__setitem__``;
    and ``torch.addmm(..., out=acc)`` (the weight-gradient GEMM of the CUDA path) to the same GEMM out of
    place, which :class:`CostTracer` records as written into ``acc`` (``inplace_accumulate``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        out = kwargs.get("out")
        if func is torch.addmm and isinstance(out, torch.Tensor) and out.device.type == "cuda":
            torch.addmm(*args, **{k: v for k, v in kwargs.items() if k != "out"})
            return out
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.__getitem__:
            return _index(args[0], args[1])
        if func is torch.Tensor.__setitem__:
            t, idx, v = args
            if isinstance(idx, torch.Tensor) and idx.dtype != torch.bool:
                v = v if isinstance(v, torch.Tensor) else torch.full((), v, dtype=t.dtype, device=t.device)
                aten.index_put_.default(t, [idx], v)
                return None
            dst = _index(t, idx)
            if isinstance(v, torch.Tensor):
                aten.copy_.default(dst, v)
            else:
                aten.fill_.Scalar(dst, v)
            return None
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:  # another binding with a CUDA device guard: call its aten op directly
            if "not linked with support for cuda" not in str(e):
                raise
            name = getattr(func, "__name__", "")
            name = _DUNDER_ATEN.get(name, name)
            if not hasattr(aten, name):
                raise
            return getattr(aten, name)(*args, **kwargs)


_DUNDER_ATEN = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or",
                "__xor__": "bitwise_xor", "__neg__": "neg", "__iand__": "bitwise_and_", "__ior__": "bitwise_or_"}


def _index(t: torch.Tensor, idx):
    aten = torch.ops.aten
    if isinstance(idx, torch.Tensor):
        return aten.index.Tensor(t, [idx])
    idx = idx if isinstance(idx, tuple) else (idx,)
    dim = 0
    for i in idx:
        if i is None:
            t = aten.unsqueeze.default(t, dim)
            dim += 1
        elif i is Ellipsis:
            dim = t.dim() - (len(idx) - idx.index(Ellipsis) - 1)
        elif isinstance(i, int):
            t = aten.select.int(t, dim, i)
        elif isinstance(i, slice):
            start, stop, step = i.indices(t.shape[dim])
            t = aten.slice.Tensor(t, dim, start, stop, step)
            dim += 1
        else:
            raise NotImplementedError(f"fake_cuda_shim: index {i!r} of type {type(i).__name__}")
    return t


def trace_call(fn: Callable[[], object], *, returned: Optional[Callable[[object], list]] = None,
               tf32: bool = False, assumptions: Optional[Assumptions] = None) -> Trace:
    """Run ``fn()`` (inside an active FakeTensorMode, inputs made before) under :class:`CostTracer` and
    :class:`fake_cuda_shim`; ``returned(result)`` lists the returned gradients, alive at the end."""
    with fake_cuda_shim(), CostTracer(tf32=tf32, assumptions=assumptions) as tracer:
        result = fn()
        grads = [g for g in (returned(result) if returned else []) if g is not None]
        del result
        returned_bytes = sum(g.untyped_storage().nbytes() for g in
                             {_storage_key(g): g for g in grads}.values() if _storage_key(g) in tracer.live)
    return Trace(tracer.ops, tracer.peak_bytes, returned_bytes, "traced", tracer.at_peak)


# ----------------------------------------------------------------------------------------------
# counted providers


class CountedTrace:
    """A trace written op by op from a published algorithm: GEMMs, kernels (bytes), allocations."""

    def __init__(self, tf32: bool = False):
        self.tf32 = tf32
        self.ops: list = []
        self.live_bytes = 0
        self.peak_bytes = 0

    def gemm(self, m, n, k, in_dtype, out_dtype, *, name="mm", accumulate=False, note="") -> None:
        self.ops.append(gemm_record(m, n, k, in_dtype, out_dtype, name=name, accumulate=accumulate,
                                    tf32=self.tf32, note=note))

    def kernel(self, name: str, reads: float, writes: float, note: str = "") -> None:
        self.ops.append(OpRecord(name, "counted", reads=int(reads), writes=int(writes), note=note))

    def alloc(self, nbytes: float) -> int:
        self.live_bytes += int(nbytes)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return int(nbytes)

    def free(self, nbytes: float) -> None:
        self.live_bytes -= int(nbytes)

    def trace(self, returned_bytes: float) -> Trace:
        return Trace(self.ops, self.peak_bytes, int(returned_bytes), "counted")


# ----------------------------------------------------------------------------------------------
# varkernels' CUDA path, driven through its autograd Functions


class _Ctx:
    """What the autograd Functions use of ``ctx``, so that their own forward and backward run without the
    autograd engine (autograd on fake CUDA tensors aborts a CPU build of torch)."""

    saved_tensors: tuple = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass


def _linear_op_body(hidden, weight, bias, labels, coef, lse_in, entropy=None, *, want_hidden, want_weight, want_bias,
                    **opts):
    """The driver operator ``varkernels::linear_token_pass`` replaced by its Python body (``linear_token_pass``),
    whose fake implementation would give only the output shapes: every op of the chunk loop is recorded."""
    from varkernels.core.linear import linear_token_pass
    from varkernels.core.token import TokenOptions

    wants = (want_hidden, want_weight, want_bias)
    return linear_token_pass(hidden, weight, bias, labels, coef, lse_in, wants, TokenOptions(**opts), entropy)


def varkernels_linear(hidden, weight, labels, coef, *, master_weight=None, chunk_size=None, accum_fp32=True,
                      tf32=False, assumptions=None) -> Trace:
    """Trace ``fused_linear_var_loss``'s computation on fake CUDA tensors: ``LinearTokenFunction``'s own
    forward in forward mode (labels, coef: [B·T], coef = d loss / d lp; gradients computed in the forward,
    every row processed: fake labels have no values to compact by), then its own backward (scale by the
    upstream gradient 1, cast to the parameter dtype). ``master_weight`` (fp32): the trainer's autocast
    step, ``weight = master.to(bf16)`` first and the bf16 weight gradient cast back to fp32 at the end
    (``hidden``/``weight`` dtype bf16). Returned gradients: grad_hidden and the weight gradient in the
    parameter's dtype."""
    from varkernels.core.autograd import LinearTokenFunction
    from varkernels.core.linear import default_chunk_size
    from varkernels.core.token import TokenOptions

    V = (master_weight if master_weight is not None else weight).shape[0]
    opts = TokenOptions("triton", chunk_size=chunk_size or default_chunk_size(V, "cuda", hidden.element_size()),
                        accum_fp32=accum_fp32)

    def run():
        w = master_weight.to(hidden.dtype) if master_weight is not None else weight
        ctx = _Ctx()
        with unittest.mock.patch.object(torch.ops.varkernels, "linear_token_pass", _linear_op_body):
            value, lp = LinearTokenFunction.forward(ctx, hidden, w, None, labels, coef, opts, (True, True, False),
                                                    w.dtype)
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        gh, gw_param, *_ = LinearTokenFunction.backward(ctx, one, None)
        del ctx  # the fp32 accumulators
        if master_weight is not None:
            gw_param = gw_param.to(master_weight.dtype)  # autograd's backward of weight.to(bf16)
            del w
        return value, gh, gw_param

    return trace_call(run, returned=lambda r: [r[1], r[2]], tf32=tf32, assumptions=assumptions)


def varkernels_logits(logits, labels, coef, *, tf32=False, assumptions=None) -> Trace:
    """Trace ``fused_var_loss``'s token op on fake CUDA logits: ``TokenFunction``'s own forward in forward
    mode with a gradient buffer (``inplace=False``), then its own backward (scale by the upstream gradient)."""
    from varkernels.core.autograd import TokenFunction
    from varkernels.core.token import TokenOptions

    def run():
        ctx = _Ctx()
        value, lp = TokenFunction.forward(ctx, logits, labels, coef, TokenOptions("triton"), False, True)
        grad = TokenFunction.backward(ctx, torch.ones((), dtype=torch.float32, device=logits.device), None)[0]
        return value, grad

    return trace_call(run, returned=lambda r: [r[1]], tf32=tf32, assumptions=assumptions)


def three_gemms(n_tokens: int, H: int, V: int, dtype=torch.bfloat16, tf32=False) -> Trace:
    """The reference of the fused-linear losses: logits = h·Wᵀ, grad_h = g·W, grad_W = gᵀ·h over all the
    tokens at once, inputs in ``dtype`` (the weight-gradient GEMM with an fp32 output)."""
    c = CountedTrace(tf32)
    c.gemm(n_tokens, V, H, dtype, dtype, name="logits = h·Wᵀ")
    c.gemm(n_tokens, H, V, dtype, dtype, name="grad_h = g·W")
    c.gemm(V, H, n_tokens, dtype, torch.float32, name="grad_W = gᵀ·h")
    return c.trace(0)
