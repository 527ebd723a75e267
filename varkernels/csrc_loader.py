"""Loader of the C++ CPU kernel of csrc/ (the extension module ``varkernels_cpu``).

``load_extension(required=False)`` returns the module or ``None``; the first call decides and the
answer is kept for the process. Loading it registers the operator ``torch.ops.varkernels.token_cpu``
(described in csrc/var_cpu.cpp); the module itself only carries ``capability``/``set_capability``
and the source hash.

1. ``VARKERNELS_DISABLE_CPP=1``: no extension (``backend="auto"`` then takes the PyTorch path).
2. The ahead-of-time build, ``varkernels.varkernels_cpu``, made by ``setup.py`` at install time.
   In a source checkout it is used only while it matches csrc/ (a hash of the sources is compiled
   into it), so an edited kernel is never silently replaced by a stale binary. The hash is read
   from the file *before* the module is imported: importing registers the operator, and a JIT
   build registering it a second time would abort the process (an uncatchable SIGABRT).
3. Otherwise a JIT build with ``torch.utils.cpp_extension.load`` (ninja) into a cache directory,
   ``$VARKERNELS_CACHE_DIR`` or ``~/.cache/varkernels`` (``$XDG_CACHE_HOME`` honoured), one
   sub-directory per torch version, Python version and machine. The build happens once; an
   exclusive file lock keeps two processes from building at the same time (the second waits,
   then loads the first one's result). A build says so, where and that it takes minutes in one
   WARNING log record (``logging.getLogger("varkernels")``), once per process.
4. No compiler / ninja / Python headers, or a failed build: ONE warning naming the cause and
   ``None`` (``required=False``), or a ``RuntimeError`` with the same message (``required=True``,
   i.e. ``backend="cpu"``). A stale ahead-of-time build replaced by a JIT build is also said in
   one warning.

Compiler flags are ``-O3`` (and ``-fopenmp`` on Linux, for ``at::parallel_for``), nothing
machine-specific: the AVX2 and AVX-512 kernels are compiled side by side (csrc/var_cpu_isa_*.cpp,
with target pragmas) and chosen at run time from ATen's CPU capability, so a cached or prebuilt
binary moved to another x86-64 machine still runs (and ``ATEN_CPU_CAPABILITY=avx2|default``
selects the lower kernels, as for PyTorch's own).

This module imports only the standard library at import time: setup.py loads it by path to
share ``SOURCES`` and ``extra_cflags()``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

MODULE_NAME = "varkernels_cpu"
AOT_MODULE = "varkernels." + MODULE_NAME
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# Link order matters: the baseline unit comes before the AVX units, so an inline function that
# several units emit out of line is resolved to its baseline copy (see csrc/var_cpu_isa_prelude.h).
SOURCES = (
    "var_cpu.cpp", "var_cpu_gemm.cpp", "var_cpu_isa_default.cpp", "var_cpu_isa_avx2.cpp", "var_cpu_isa_avx512.cpp"
)
CFLAGS = ("-O3", "-Wno-psabi")  # -Wno-psabi: GCC notes on the AVX-512 argument ABI, as in PyTorch's build
# at::parallel_for is a header template: with PyTorch's OpenMP backend it only runs in parallel
# when the extension itself is compiled with OpenMP (it then uses the libgomp torch has loaded).
OPENMP_FLAGS = ("-fopenmp",) if sys.platform.startswith("linux") else ()

log = logging.getLogger("varkernels")

_lock = threading.Lock()
_state: dict = {}  # "module": the loaded module or None; "error": why it is None; "stale": see _load_aot
_announced: set = set()  # the build directory once a build has been announced (once per process)
_on_load: list = []  # callbacks run once the module is loaded (the owner of an operator registers its fake)


def on_load(callback) -> None:
    """Run ``callback()`` once the extension is loaded (now, if it already is). The Python module that
    owns the C++ operator registers its fake implementation this way, so the loader imports nothing of
    the package."""
    with _lock:
        _on_load.append(callback)
        loaded = _state.get("module") is not None
    if loaded:
        callback()


def source_hash(csrc: Path = CSRC) -> str | None:
    """Hash of every file of csrc/ (None when the sources are not shipped, e.g. a wheel install)."""
    if not csrc.is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(csrc.iterdir()):
        if p.suffix in (".cpp", ".h") and p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def extra_cflags(csrc: Path = CSRC) -> list:
    """Compiler flags shared by the ahead-of-time (setup.py) and JIT builds."""
    return [*CFLAGS, *OPENMP_FLAGS, f"-DVARKERNELS_SOURCE_HASH={source_hash(csrc) or 'none'}"]


def extra_ldflags() -> list:
    """Linker flags shared by the ahead-of-time (setup.py) and JIT builds."""
    return list(OPENMP_FLAGS)


def cache_dir() -> Path:
    """Build directory of the JIT extension for this torch / Python / machine."""
    import torch

    root = os.environ.get("VARKERNELS_CACHE_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "varkernels"
    tag = f"torch-{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}"
    return base / tag.replace("+", "_")


def _missing_toolchain() -> str | None:
    """Why a JIT build cannot even start, or None."""
    import sysconfig

    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler found (looked for {cxx!r}; set CXX or install g++/clang++)"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").exists():
        return f"the Python development headers are missing (no Python.h in {include})"
    if not all((CSRC / s).is_file() for s in SOURCES):
        return f"the C++ sources are not available (expected {', '.join(SOURCES)} in {CSRC})"
    return None


def aot_origin() -> str | None:
    """File of the ahead-of-time module, found without importing it (None when it is not built)."""
    try:
        spec = importlib.util.find_spec(AOT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin not in (None, "built-in", "frozen") else None


def stale_reason(origin: str, csrc: Path = CSRC) -> str | None:
    """Why the binary ``origin`` was not built from the current csrc/, or None (also when the sources
    are not shipped). Read from the file's bytes, where the hash is a string constant: importing the
    module would register its operator, and a JIT build registering it again aborts the process."""
    current = source_hash(csrc)
    if current is None:
        return None
    try:
        data = Path(origin).read_bytes()
    except OSError as e:
        return f"the prebuilt CPU extension {origin} cannot be read ({e})"
    if current.encode() in data:
        return None
    return f"the prebuilt CPU extension {origin} is older than csrc/ (its source hash is not {current})"


def _load_aot():
    """The module built by setup.py, if present and built from the current csrc/ (checked before it
    is imported); a stale one is not imported and the reason is kept in ``_state["stale"]``."""
    if AOT_MODULE in sys.modules:  # imported by someone already: its operator is registered, use it
        return sys.modules[AOT_MODULE]
    origin = aot_origin()
    if origin is None:  # not built (VARKERNELS_SKIP_CPP_BUILD=1)
        log.debug("varkernels: no ahead-of-time CPU extension")
        return None
    stale = stale_reason(origin)
    if stale is not None:
        _state["stale"] = stale
        return None
    try:
        return importlib.import_module(AOT_MODULE)
    except (ImportError, OSError) as e:  # built for another torch or Python
        log.debug("varkernels: the ahead-of-time CPU extension does not load (%s)", e)
        return None


class _FileLock:
    """Exclusive lock on a file (fcntl.flock: released by the OS if the holder dies)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: torch's own FileBaton still serialises the build
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _built(build_dir: Path, csrc: Path = CSRC) -> bool:
    """A JIT build of the current sources is in ``build_dir`` (newer than each of them): loading it is quick."""
    so = build_dir / f"{MODULE_NAME}.so"
    try:
        return all(so.stat().st_mtime >= (csrc / s).stat().st_mtime for s in SOURCES)
    except OSError:
        return False


def announce_build(build_dir: Path) -> None:
    """Say that the C++ kernel is being built, where, and that it takes minutes: at WARNING level (shown by
    default, unlike INFO), the first time in a process; a build already in ``build_dir`` is only logged at
    INFO. A first build took 5-12 minutes on a loaded machine with nothing shown."""
    if _built(build_dir) or _announced:
        log.info("varkernels: loading the JIT build of the C++ CPU kernel in %s", build_dir)
        return
    _announced.add(build_dir)
    log.warning(
        "varkernels: building the C++ CPU kernel (first use, once per machine and torch version) in %s "
        "(or waiting there for another process's build); "
        "this takes 1-2 minutes, longer on a loaded machine. VARKERNELS_VERBOSE_BUILD=1 shows the compiler, "
        "VARKERNELS_DISABLE_CPP=1 skips it (backend='auto' then takes the PyTorch path).",
        build_dir,
    )


def _build_jit(verbose: bool = False):
    from torch.utils.cpp_extension import load

    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    announce_build(build_dir)  # before the lock: waiting on another process's build takes minutes too
    with _FileLock(build_dir / ".varkernels-build.lock"):
        # torch's FileBaton ("lock") is left behind if a build is killed, and then every later
        # build waits on it forever; under our lock no other varkernels build can own it.
        stale = build_dir / "lock"
        if stale.exists():
            stale.unlink()
        return load(
            name=MODULE_NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=extra_cflags(),
            extra_ldflags=extra_ldflags(),
            build_directory=str(build_dir),
            verbose=verbose,
        )


def _load():
    if os.environ.get("VARKERNELS_DISABLE_CPP", "0") == "1":
        return None, "disabled by VARKERNELS_DISABLE_CPP=1"
    mod = _load_aot()
    if mod is not None:
        return mod, None
    stale = _state.get("stale")
    prefix = f"{stale}, and it cannot be JIT-built: " if stale else ""
    missing = _missing_toolchain()
    if missing is not None:
        return None, prefix + missing
    try:
        return _build_jit(verbose=os.environ.get("VARKERNELS_VERBOSE_BUILD", "0") == "1"), None
    except Exception as e:  # compiler errors come back as RuntimeError / subprocess errors
        lines = str(e).strip().splitlines()
        tail = "\n".join(lines[-15:])
        hint = "set VARKERNELS_VERBOSE_BUILD=1 for the full log"
        return None, f"{prefix}the JIT build failed ({type(e).__name__}); {hint}:\n{tail}"


def load_extension(required: bool = False):
    """The ``varkernels_cpu`` module, or None when it cannot be had (see the module docstring).

    Args:
        required: raise ``RuntimeError`` instead of returning None (``backend="cpu"``).
    """
    with _lock:
        if "module" not in _state:
            mod, error = _load()
            _state["module"], _state["error"] = mod, error
            if mod is not None:  # the operator's schema exists from here on
                for callback in _on_load:
                    callback()
            if mod is None and not required and not error.startswith("disabled"):
                warnings.warn(
                    f"varkernels: the C++ CPU kernel is unavailable: {error}. "
                    "backend='auto' uses the PyTorch path on CPU (correct, slower).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            elif mod is not None and "stale" in _state:
                warnings.warn(
                    f"varkernels: {_state['stale']}; using a JIT build of the current sources instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    mod = _state["module"]
    if mod is None and required:
        raise RuntimeError(
            f"backend='cpu' needs the C++ CPU kernel of varkernels, which is unavailable: {_state['error']}. "
            "Use backend='torch' (or 'auto') instead."
        )
    return mod


def _reset_for_tests() -> None:
    """Forget the cached decision (tests of the loader only)."""
    with _lock:
        _state.clear()
