"""The C++ loader with a stale ahead-of-time build (varkernels/csrc_loader.py).

A temporary copy of the package (varkernels/ with its prebuilt binary, and csrc/) gets an edited
csrc file; a CPU loss then runs in a subprocess. The stale binary must be detected before it is
imported — importing registers ``varkernels::token_cpu``, and a JIT build registering it again
aborts the process (SIGABRT, uncatchable) — and the call must give the right result with one warning.

Fast variants: without a compiler (the PyTorch path), and with a stand-in for the JIT build that
loads a copy of the binary under the JIT module's name (it registers the operator as a real JIT
build does, in a second instead of 1-2 minutes). The variant with a real JIT build is ``slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from varkernels import csrc_loader

ROOT = Path(csrc_loader.__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, os, sys, warnings
    import torch
    import varkernels
    from varkernels import csrc_loader
    from varkernels.reference import weighted_nll_reference

    assert varkernels.__file__.startswith(sys.argv[1]), varkernels.__file__
    if sys.argv[2] == "stand-in-jit":
        def build_jit(verbose=False):  # what a JIT build does: load a module that registers the operator
            spec = importlib.util.spec_from_file_location(csrc_loader.MODULE_NAME, sys.argv[3])
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        csrc_loader._build_jit = build_jit
        csrc_loader._missing_toolchain = lambda: None
    torch.manual_seed(0)
    x = torch.randn(3, 6, 101, requires_grad=True)
    y = torch.randint(0, 101, (3, 6))
    y[0, :2] = -100
    w = torch.rand(3, 6)
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = varkernels.weighted_nll(x, y, w, backend="auto")
        loss.backward()
        try:
            varkernels.weighted_nll(x.detach(), y, w, backend="cpu")
            result["cpu"] = "ran"
        except RuntimeError as e:
            result["cpu"] = str(e)
    xr = x.detach().clone().requires_grad_()
    ref = weighted_nll_reference(xr, y, w)
    ref.backward()
    mod = csrc_loader.load_extension(required=False)
    result.update(
        loss=float(loss), ref=float(ref), grad_err=float((x.grad - xr.grad).abs().max()),
        warnings=[str(m.message) for m in caught if "varkernels" in str(m.message)],
        module=None if mod is None else mod.__name__,
        registered=hasattr(torch.ops.varkernels, "token_cpu"),
        aot_imported=csrc_loader.AOT_MODULE in sys.modules,
    )
    print(json.dumps(result))
    """
)


def _aot_binary() -> Path:
    origin = csrc_loader.aot_origin()
    if origin is None or Path(origin).resolve().parent != ROOT / "varkernels":
        pytest.skip("no ahead-of-time build of the C++ kernel in this tree (VARKERNELS_SKIP_CPP_BUILD=1?)")
    if csrc_loader.stale_reason(origin) is not None:
        pytest.skip("the ahead-of-time build of this tree is already stale")
    return Path(origin)


def _copy_package(tmp_path: Path, *, edit: bool) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(ROOT / "varkernels", dst / "varkernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "csrc", dst / "csrc")
    if edit:
        with open(dst / "csrc" / "var_cpu.cpp", "a") as f:
            f.write("\n// an edit after the ahead-of-time build\n")
    return dst


def _run(pkg: Path, mode: str, binary: Path, tmp_path: Path, **env) -> dict:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("VARKERNELS_", "TRITON_INTERPRET"))}
    full_env.update(PYTHONPATH=str(pkg), VARKERNELS_CACHE_DIR=str(tmp_path / "cache"), **env)
    stand_in = tmp_path / "stand_in" / binary.name
    stand_in.parent.mkdir(exist_ok=True)
    shutil.copy(binary, stand_in)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(pkg), mode, str(stand_in)], capture_output=True,
                         text=True, env=full_env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, f"rc {out.returncode} (-6 / 134: SIGABRT)\n{out.stderr[-4000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(result["loss"] - result["ref"]) <= 1e-5 * max(1.0, abs(result["ref"])), result
    assert result["grad_err"] <= 1e-6, result
    return result


def test_fresh_build_is_used(tmp_path):
    binary = _aot_binary()
    r = _run(_copy_package(tmp_path, edit=False), "plain", binary, tmp_path)
    assert r["module"] == csrc_loader.AOT_MODULE and r["cpu"] == "ran" and r["warnings"] == [], r


def test_stale_build_without_compiler_takes_the_torch_path(tmp_path):
    binary = _aot_binary()
    r = _run(_copy_package(tmp_path, edit=True), "plain", binary, tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert r["module"] is None and not r["registered"] and not r["aot_imported"], r  # nothing registered
    assert len(r["warnings"]) == 1, r["warnings"]
    assert "older than csrc/" in r["warnings"][0] and "no C++ compiler" in r["warnings"][0], r["warnings"]
    assert "backend='cpu' needs the C++ CPU kernel" in r["cpu"] and "older than csrc/" in r["cpu"], r


def test_stale_build_replaced_by_a_jit_build_registers_once(tmp_path):
    """The JIT build registers the operator: with the stale binary imported first, that aborted."""
    binary = _aot_binary()
    r = _run(_copy_package(tmp_path, edit=True), "stand-in-jit", binary, tmp_path)
    assert r["module"] == csrc_loader.MODULE_NAME and r["registered"] and not r["aot_imported"], r
    assert r["cpu"] == "ran", r
    assert len(r["warnings"]) == 1 and "using a JIT build" in r["warnings"][0], r["warnings"]


@pytest.mark.slow
def test_stale_build_real_jit_build(tmp_path):
    """The same with a real JIT build of the edited sources (1-2 min)."""
    binary = _aot_binary()
    if csrc_loader._missing_toolchain() is not None:
        pytest.skip(f"no JIT build possible here: {csrc_loader._missing_toolchain()}")
    r = _run(_copy_package(tmp_path, edit=True), "plain", binary, tmp_path)
    assert r["module"] == csrc_loader.MODULE_NAME and r["registered"] and not r["aot_imported"], r
    assert r["cpu"] == "ran" and len(r["warnings"]) == 1 and "using a JIT build" in r["warnings"][0], r
