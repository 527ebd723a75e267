"""Throughput of every provider of tools/peers.py at small sizes, with pytest-benchmark.

    pytest benchmarks/ --benchmark-only                      # ~40 s on 2 CPU cores
    pytest benchmarks/ --benchmark-only -k "logits and bf16"
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Forward + backward of the whole VAR loss (upstream gradient 1), 5 rounds after a warm-up round;
``extra_info`` carries tokens/s from the median and the shape. A provider that cannot run here is
skipped with its reason. These files live outside tests/ (pyproject's testpaths), so
``pytest tests/`` and plain ``pytest`` never collect them; bench_peers.py is the full sweep.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

pytest.importorskip("pytest_benchmark")
from tools.peers import get_providers, make_inputs  # noqa: E402  (the repository root: pyproject's pythonpath)

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),  # inductor's own deprecation notices
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # torch.jit.script_method, via peers' imports
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"logits": dict(B=2, T=64, V=32000), "linear": dict(B=2, T=64, V=32000, H=256)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NAMES = {
    "logits": ["naive", "torch.compile(naive)", "varkernels[cpu]", "varkernels[torch]", "varkernels[triton]",
               "liger[ce]", "cce"],
    "linear": ["naive", "torch.compile(naive)", "varkernels[cpu]", "varkernels[torch]", "varkernels[triton]",
               "liger[flce]", "liger[chunked]", "cce[cce]", "cce[torch_compile]"],
}


@functools.cache
def _providers(form: str) -> dict:
    return {p.name: p for p in get_providers(form, DEVICE)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form,name", [(f, n) for f, names in NAMES.items() for n in names])
def test_var_loss_throughput(benchmark, form, name, dtype):
    provider = _providers(form).get(name)
    if provider is None:
        pytest.skip(f"{name}: not a provider of this peers.py")
    if not provider.runnable:
        pytest.skip(f"{name}: {provider.skip}")
    if provider.uses_triton and DEVICE == "cpu":
        pytest.skip(f"{name}: Triton kernels on CPU run in the interpreter; its wall time is not the kernel's")
    shape = SHAPES[form]
    x = make_inputs(form, dtype=DTYPES[dtype], device=DEVICE, **shape)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def step():
        x.zero_grad()
        loss = provider.loss(x)
        loss.backward()
        sync()
        return loss

    loss = benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    assert math.isfinite(loss.item())
    benchmark.extra_info.update(form=form, provider=name, dtype=dtype, device=DEVICE, **shape)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["tokens_per_s"] = x.tokens / stats.stats.median
