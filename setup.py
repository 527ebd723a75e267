"""Metadata lives in pyproject.toml; this file only builds the C++ CPU extension of csrc/.

    pip install --no-build-isolation -e .        # builds varkernels/varkernels_cpu*.so (~1 min)
    VARKERNELS_SKIP_CPP_BUILD=1 pip install ...  # skip it: varkernels JIT-builds on first use

``--no-build-isolation`` makes the build use the torch already installed (a CPU build, pinned by
scripts/install.sh); an isolated build would download torch again, by default a CUDA build, and
compile against a torch that is not the one used at run time. Without torch or a C++ compiler
at build time, the package installs without the extension (csrc_loader.py then JIT-builds it, or
falls back to the PyTorch path with one warning).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _loader():
    """varkernels/csrc_loader.py by path (importing the package would need its dependencies)."""
    spec = importlib.util.spec_from_file_location("_varkernels_csrc_loader", ROOT / "varkernels" / "csrc_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension_kwargs():
    if os.environ.get("VARKERNELS_SKIP_CPP_BUILD", "0") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("varkernels: torch is not importable at build time; skipping the C++ extension "
              "(it is JIT-built on first use)", file=sys.stderr)
        return {}
    if shutil.which(os.environ.get("CXX", "c++").split()[0]) is None:
        print("varkernels: no C++ compiler; skipping the C++ extension", file=sys.stderr)
        return {}

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """A failed compile leaves the package installable: the loader JIT-builds (and warns) instead."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler errors surface as various distutils/subprocess errors
                if os.environ.get("VARKERNELS_REQUIRE_CPP_BUILD", "0") == "1":
                    raise
                print(f"varkernels: building the C++ extension failed ({e}); installing without it "
                      "(set VARKERNELS_REQUIRE_CPP_BUILD=1 to make this an error)", file=sys.stderr)

    loader = _loader()
    ext = CppExtension(
        name=loader.AOT_MODULE,
        sources=[f"csrc/{s}" for s in loader.SOURCES],  # relative paths: setuptools requires them
        depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h")),
        extra_compile_args=loader.extra_cflags(ROOT / "csrc"),
        extra_link_args=loader.extra_ldflags(),
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension}}


setup(**_extension_kwargs())
