"""Ahead-of-time compilation of Triton kernels for NVIDIA GPUs, without a GPU (docs/design.md §4.2).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` runs the whole NVIDIA
pipeline (TTIR → TTGIR → LLVM → PTX → ptxas → cubin) on the CPU. The cubin's resource usage is
read with ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel under
``triton/backends/nvidia/bin``): ``REG`` registers per thread, ``SHARED`` static shared memory,
``LOCAL`` local memory per thread, ``STACK`` the per-thread stack frame. Register spills show up in
either: with triton 3.9's ptxas they usually land in the stack frame (``STL``/``LDL`` to ``[R1+…]``
in the SASS) while LOCAL stays 0, so "no spills" means LOCAL 0 *and* STACK 0 (Triton kernels
make no calls, so they need no stack otherwise).

The compiled code must be the one a real launch would build, so the specialisation is taken
from the launcher itself:

    with capture_launches(_triton_kernels, "_token_kernel") as launches:
        token_triton(x_on_meta_device, ...)      # the launcher picks BLOCK_V, num_warps, strides
    spec = launch_spec(launches[0].kernel, launches[0].kwargs)
    results = compile_specs([spec], archs=(80, 90))   # {(spec, "sm_80"): {"regs": .., "local": ..}, ...}

``launch_spec`` repeats what ``JITFunction.run`` does before compiling: it turns ``None`` arguments into
``constexpr None`` (what triton 3.x does with a ``None`` pointer: the branch using it is never
traced), turns integers equal to 1 into ``constexpr 1`` (a unit stride) and marks pointers and
integers divisible by 16 with ``tt.divisibility``. Tensors on the ``meta`` device are enough: only
their dtype and data pointer (0, i.e. aligned, as the CUDA caching allocator guarantees) matter.

``compile_kernel(kernel, signature, constexprs, arch, num_warps)`` is the same for a hand-written
signature.

When triton was imported with ``TRITON_INTERPRET=1`` (the test suite), ``triton.language``'s own
library functions (``tl.zeros``, ``tl.sum``...) are interpreter objects and nothing can be compiled
in that process, so compilation runs in subprocesses (``python -m tools.aot``) with
the interpreter off; they import the kernel's module by name, i.e. compile the package's source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import types
from typing import Any

from varkernels._extras import missing_extra

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import KernelParam
except ImportError as e:
    raise missing_extra("triton", "triton", "tools.aot") from e

__all__ = [
    "ARCH_LIMITS",
    "KernelSpec",
    "Launch",
    "capture_launches",
    "compile_kernel",
    "compile_specs",
    "cuobjdump_path",
    "launch_spec",
    "occupancy_estimate",
    "parse_resource_usage",
]


# Per-SM limits of the CUDA occupancy calculator (CUDA C Programming Guide, "Compute capabilities"
# table): 64 K 32-bit registers in 4 sub-partitions, registers allocated per warp in units of 256,
# 64 resident warps, 32 resident blocks, shared memory usable per SM, and 1 KiB of shared memory
# the driver reserves per block.
ARCH_LIMITS = {
    80: dict(regs=65536, sub_partitions=4, reg_unit=256, max_regs_per_thread=255,
             warps=64, blocks=32, smem=164 * 1024, smem_reserved_per_block=1024),
    90: dict(regs=65536, sub_partitions=4, reg_unit=256, max_regs_per_thread=255,
             warps=64, blocks=32, smem=228 * 1024, smem_reserved_per_block=1024),
}


def _cap(arch) -> int:
    """80, "80", "sm_80" → 80."""
    return int(str(arch).lower().replace("sm_", "").replace("sm", ""))


def cuobjdump_path() -> str | None:
    """cuobjdump of the triton wheel, else the one on PATH, else None."""
    wheel = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(wheel) and os.access(wheel, os.X_OK):
        return wheel
    return shutil.which("cuobjdump")


# ----------------------------------------------------------------------------------------------
# kernel objects


def _unwrap(kernel) -> list:
    """[the kernel object, ..., the Python function it wraps] (JITFunction or interpreter kernel → fn)."""
    chain = [kernel]
    while hasattr(chain[-1], "fn") and not isinstance(chain[-1], types.FunctionType):
        chain.append(chain[-1].fn)
    if not isinstance(chain[-1], types.FunctionType):
        raise TypeError(f"cannot find the Triton function behind {kernel!r}")
    return chain


def _kernel_params(kernel) -> list:
    """triton's ``KernelParam``s of ``kernel`` (also for interpreter kernels, which lack them)."""
    chain = _unwrap(kernel)
    for obj in chain:
        if isinstance(obj, triton.runtime.JITFunction):
            return obj.params
    fn, jit_kwargs = chain[-1], getattr(chain[-2], "kwargs", {}) if len(chain) > 1 else {}
    dns = jit_kwargs.get("do_not_specialize") or []
    dns_oa = jit_kwargs.get("do_not_specialize_on_alignment") or []
    return [
        KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
        for i, p in enumerate(inspect.signature(fn).parameters.values())
    ]


def _interpreting() -> bool:
    """True when triton.language itself was built for the interpreter (TRITON_INTERPRET=1 at import):
    its library functions (tl.zeros, tl.sum, ...) are then interpreter objects and nothing in this
    process can be compiled; compilation goes to a subprocess with the interpreter off."""
    return not isinstance(triton.language.standard.zeros, triton.runtime.JITFunction)


def _load_jit_function(module: str, name: str) -> triton.runtime.JITFunction:
    obj = getattr(importlib.import_module(module), name)
    for o in _unwrap(obj):
        if isinstance(o, triton.runtime.JITFunction):
            return o
    raise TypeError(f"{module}.{name} is not a JITFunction (is TRITON_INTERPRET=1 set?)")


# ----------------------------------------------------------------------------------------------
# launch capture and specialisation


@dataclasses.dataclass
class Launch:
    """One kernel launch as the launcher wrote it: ``kernel[grid](**kwargs)``."""

    name: str
    kernel: Any  # the original kernel object
    grid: Any
    kwargs: dict


class _Recorder:
    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if args:
                raise TypeError(f"{self.name}: capture_launches records keyword launches only")
            self.launches.append(Launch(self.name, self.kernel, grid, kwargs))

        return launch


@contextlib.contextmanager
def capture_launches(module: types.ModuleType, *names: str, as_on_gpu: bool = True):
    """Replace the kernels ``names`` of ``module`` by recorders while the block runs.

    Launchers that import the kernel at call time (``from ._triton_kernels import k``) see the
    recorder, which ``torch.library.wrap_triton`` passes through while the block runs (it accepts
    only Triton kernels otherwise); nothing is executed, so the launcher can be called with ``meta`` tensors of the full
    production shape. With ``as_on_gpu`` the interpreter is switched off (``TRITON_INTERPRET=0``)
    for the block, so launchers that choose a configuration for the interpreter choose the one
    of a GPU run. Yields the list of recorded ``Launch``es.
    """
    import torch

    launches: list = []
    originals = {name: getattr(module, name) for name in names}
    wrap_triton = torch.library.wrap_triton

    def wrap_or_record(kernel):  # the launchers call torch.library.wrap_triton(kernel)[grid](...)
        return kernel if isinstance(kernel, _Recorder) else wrap_triton(kernel)

    with contextlib.ExitStack() as stack:
        if as_on_gpu:
            stack.enter_context(triton.knobs.runtime.scope())  # restores the knob and the environment
            triton.knobs.runtime.interpret = False
        try:
            torch.library.wrap_triton = wrap_or_record
            for name, kernel in originals.items():
                setattr(module, name, _Recorder(name, kernel, launches))
            yield launches
        finally:
            torch.library.wrap_triton = wrap_triton
            for name, kernel in originals.items():
                setattr(module, name, kernel)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """What triton compiles for one launch: equal specs give the identical cubin.

    Plain data (module and function name, no function object), so it can be sent to the
    compiling subprocess and used as a cache key.
    """

    module: str
    name: str
    signature: tuple  # ((arg name, "*bf16" | "i32" | "fp32" | "constexpr" | ...), ...) for every argument
    constexprs: tuple  # ((arg name, value), ...) for every "constexpr" entry
    attrs: tuple = ()  # (((arg index,), (("tt.divisibility", 16),)), ...)
    num_warps: int = 4
    options: tuple = ()  # further compile options of the launch (num_stages, ...)

    def describe(self) -> str:
        ce = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        ptrs = ", ".join(f"{k}:{v}" for k, v in self.signature if v.startswith("*"))
        return f"{self.name}[{ce}; {ptrs}; num_warps={self.num_warps}]"


def launch_spec(kernel, launch_kwargs: dict) -> KernelSpec:
    """The specialisation ``JITFunction.run`` would compile for ``kernel[grid](**launch_kwargs)``."""
    from triton._C.libtriton import native_specialize_impl

    chain = _unwrap(kernel)
    params = _kernel_params(kernel)
    names = [p.name for p in params]
    args = dict(launch_kwargs)
    options = {k: args.pop(k) for k in list(args) if k not in names}
    num_warps = int(options.pop("num_warps", 4))  # triton's default for NVIDIA

    backend = _cuda_backend()
    signature, constexprs, attrs = [], [], []
    for i, p in enumerate(params):
        if p.name in args:
            value = args[p.name]
        elif p.has_default:
            value = p.default
        else:
            raise TypeError(f"{chain[-1].__name__}: the launch does not give argument {p.name!r}")
        if p.is_constexpr:
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, value))
            continue
        ty, attr = native_specialize_impl(
            backend, value, p.is_const, not p.do_not_specialize, not p.do_not_specialize_on_alignment
        )
        if p.annotation_type:  # annotated arguments keep their type; floats and bools are not specialised
            ty = p.annotation_type
            if ty == "u1" or ty[:2] in ("fp", "bf"):
                attr = None
        signature.append((p.name, ty))
        if ty == "constexpr":  # None arguments and integers equal to 1
            constexprs.append((p.name, attr))
        elif isinstance(attr, str) and backend.parse_attr(attr):
            attrs.append(((i,), tuple(tuple(a) for a in backend.parse_attr(attr))))
    fn = chain[-1]
    return KernelSpec(fn.__module__, fn.__name__, tuple(signature), tuple(constexprs), tuple(attrs),
                      num_warps, tuple(sorted(options.items())))


def _cuda_backend():
    return triton.backends.backends["nvidia"].compiler


# ----------------------------------------------------------------------------------------------
# compilation and resource usage


_RESOURCE_RE = re.compile(r"Function\s+(\S+):\s*\n\s*(.+)")
_FIELD_RE = re.compile(r"([A-Z_]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> dict:
    """``{function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}`` from cuobjdump output."""
    return {m.group(1): {k: int(v) for k, v in _FIELD_RE.findall(m.group(2))} for m in _RESOURCE_RE.finditer(text)}


def resource_usage(cubin: bytes) -> dict:
    """cuobjdump --dump-resource-usage of a cubin, parsed (one entry per function)."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (neither in the triton wheel nor on PATH)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    usage = parse_resource_usage(proc.stdout)
    if not usage:
        raise RuntimeError(f"could not parse cuobjdump output:\n{proc.stdout}\n{proc.stderr}")
    return usage


def occupancy_estimate(regs: int, shared_bytes: int, num_warps: int, arch) -> dict:
    """ESTIMATE of resident warps per SM from registers and shared memory (CUDA occupancy
    calculator rules, see ``ARCH_LIMITS``). Not a measurement: the driver's shared-memory carveout
    and the grid size are ignored.

    Registers are allocated per warp in units of 256; each of the 4 SM sub-partitions holds a
    quarter of the register file and a quarter of a block's warps (rounded up).
    """
    lim = ARCH_LIMITS[_cap(arch)]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / lim["reg_unit"]) * lim["reg_unit"]
    warps_per_sub = (lim["regs"] // lim["sub_partitions"]) // regs_per_warp
    limits = {
        "registers": warps_per_sub // math.ceil(num_warps / lim["sub_partitions"]),
        "shared": lim["smem"] // (shared_bytes + lim["smem_reserved_per_block"]),
        "warps": lim["warps"] // num_warps,
        "blocks": lim["blocks"],
    }
    blocks = min(limits.values())
    return {
        "est_blocks_per_sm": blocks,
        "est_warps_per_sm": blocks * num_warps,
        "est_occupancy": blocks * num_warps / lim["warps"],
        "est_limiter": min(limits, key=limits.get),
    }


def _compile_here(spec: KernelSpec, cap: int) -> dict:
    """Compile in this process (triton.language must not be in interpreter mode)."""
    fn = _load_jit_function(spec.module, spec.name)
    attrs = {k: [list(a) for a in v] for k, v in spec.attrs}
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, **dict(spec.options)}
    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    name = compiled.metadata.name
    if name not in usage:
        raise RuntimeError(f"cuobjdump reports {sorted(usage)}, not {name}")
    u = usage[name]
    dynamic_shared = int(compiled.metadata.shared)
    result = {
        "kernel": spec.name,
        "arch": f"sm_{cap}",
        "num_warps": spec.num_warps,
        "regs": u["REG"],
        "shared": u["SHARED"],
        "dynamic_shared": dynamic_shared,
        "local": u["LOCAL"],
        "stack": u["STACK"],
        "spills": u["LOCAL"] > 0 or u["STACK"] > 0,
        "ptx_bytes": len(compiled.asm["ptx"]),
        "cubin_bytes": len(compiled.asm["cubin"]),
    }
    result.update(occupancy_estimate(u["REG"], u["SHARED"] + dynamic_shared, spec.num_warps, cap))
    return result


def _compile_in_subprocesses(jobs: list, workers: int) -> list:
    """[(spec, cap)] compiled by ``python -m tools.aot`` with TRITON_INTERPRET=0."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: ``tools`` is importable
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, *sys.path, env.get("PYTHONPATH", "")] if p)
    chunks = [jobs[i::workers] for i in range(workers)]
    chunks = [c for c in chunks if c]
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for i, chunk in enumerate(chunks):
            inp, out, err = (os.path.join(d, f"{kind}{i}") for kind in ("in", "out", "err"))
            with open(inp, "wb") as f:
                pickle.dump(chunk, f)
            cmd = [sys.executable, "-m", "tools.aot", inp, out]
            with open(err, "wb") as f_err:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=f_err)
            procs.append((chunk, out, err, proc))
        results = {}
        for chunk, out, err, proc in procs:
            if proc.wait() != 0:
                with open(err, errors="replace") as f:
                    raise RuntimeError(f"AOT compile subprocess failed ({proc.returncode}):\n{f.read()[-4000:]}")
            with open(out, "rb") as f:
                results.update(zip(chunk, pickle.load(f)))
    return [results[job] for job in jobs]


_COMPILED: dict = {}


def compile_specs(specs, archs=(80, 90), workers: int = 2) -> dict:
    """Compile every (spec, arch) once; returns {(spec, "sm_XX"): result}. Cached in-process.

    Under the interpreter the work is split over ``workers`` subprocesses (triton compiles on one
    core; process start-up, ~3 s, is paid once per worker).
    """
    jobs = []
    for spec in specs:
        for arch in archs:
            job = (spec, _cap(arch))
            if job not in _COMPILED and job not in jobs:
                jobs.append(job)
    if jobs:
        if _interpreting():
            for job, res in zip(jobs, _compile_in_subprocesses(jobs, max(1, min(workers, len(jobs))))):
                _COMPILED[job] = res
        else:
            for spec, cap in jobs:
                _COMPILED[(spec, cap)] = _compile_here(spec, cap)
    return {(spec, f"sm_{_cap(a)}"): dict(_COMPILED[(spec, _cap(a))]) for spec in specs for a in archs}


def compile_kernel(kernel, signature: dict, constexprs: dict, arch, num_warps: int = 4, *,
                   attrs: dict | None = None, options: dict | None = None) -> dict:
    """Compile ``kernel`` for ``sm_<arch>`` and report the cubin's resources.

    Args:
        kernel: a JITFunction or an interpreter kernel.
        signature: {arg name: "*bf16" | "i32" | "fp32" | "constexpr" | ...} for every argument.
            ``None`` pointers are "constexpr" with value None in ``constexprs`` (what triton 3.x
            does at launch).
        constexprs: {arg name: value} for every "constexpr" entry.
        arch: 80, 90 (or "sm_80", ...). num_warps: as in the launch.
        attrs: {(arg index,): [["tt.divisibility", 16]]}, as ``launch_spec`` derives them; default none.
    Returns:
        dict with ``regs``, ``shared`` (static bytes, from cuobjdump), ``dynamic_shared`` (triton's
        metadata), ``local`` and ``stack`` bytes per thread, ``spills`` (local > 0 or stack > 0), the ``est_*``
        occupancy ESTIMATE and the PTX / cubin sizes.
    """
    fn = _unwrap(kernel)[-1]
    missing = [k for k, v in signature.items() if v == "constexpr" and k not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: constexprs missing for {missing} (the HAS_* switches and None "
                         "pointers must be given explicitly)")
    spec = KernelSpec(
        fn.__module__, fn.__name__, tuple(signature.items()), tuple(constexprs.items()),
        tuple((k, tuple(tuple(a) for a in v)) for k, v in sorted((attrs or {}).items())),
        num_warps, tuple(sorted((options or {}).items())),
    )
    return compile_specs([spec], [arch])[(spec, f"sm_{_cap(arch)}")]


def _worker_main(argv) -> int:
    """Subprocess entry: unpickle [(spec, cap)] from argv[0], pickle the results to argv[1]."""
    with open(argv[0], "rb") as f:
        jobs = pickle.load(f)
    results = [_compile_here(spec, cap) for spec, cap in jobs]
    with open(argv[1], "wb") as f:
        pickle.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
