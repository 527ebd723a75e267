"""benchmarks/gpu_suite.sh without a GPU: the dry run, the refusals, and the suite's own pieces.

The suite's real run needs CUDA (none here). What CI checks: ``--dry-run`` imports everything
and prints the plan without writing anything; a real run on a machine without CUDA (or with the
Triton interpreter switched on) refuses with exit status 2; the parity code of part 1 runs (on CPU
tensors under the interpreter) and stops on a mismatch; the roofline estimates are read from a
cost-model CSV or shown as "n/a"; the table and the plot are drawn from rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def _run(args, env_update=None, drop=("TRITON_INTERPRET",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(env_update or {})
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out_csv, out_png = tmp_path / "suite.csv", tmp_path / "suite.png"
    proc = _run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--csv", str(out_csv), "--plot", str(out_png)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "imports ok" in text and "no GPU is touched" in text
    assert "1. parity on CUDA" in text and f"{len(gpu_suite.parity_cases())} cases" in text
    for head, (H, V) in gpu_suite.HEADS.items():
        for tokens in gpu_suite.TOKENS:
            assert f"{head:10s} H={H} V={V} tokens={tokens}" in text, text
    assert "varkernels[triton]" in text and "torch[linear_cross_entropy]" in text
    assert "roofline estimates from" in text
    assert not out_csv.exists() and not out_png.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real run would start")
def test_real_run_refuses_without_cuda(tmp_path):
    proc = _run([sys.executable, "benchmarks/gpu_suite.py", "--csv", str(tmp_path / "x.csv")])
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr, proc.stderr
    proc = _run([sys.executable, "benchmarks/gpu_suite.py"], env_update={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr
    assert not (tmp_path / "x.csv").exists()


SMALL_CASES = [
    ("fused_var_loss", "float32", dict(B=2, T=9, V=1000), dict(ignored_rows=(1,))),
    ("fused_var_loss", "bfloat16", dict(B=2, T=5, V=1000), dict(softcap=30.0, temperature=1.3)),
    ("sequence_logps", "float32", dict(B=3, T=9, V=1000), dict(reduction="mean", softcap=5.0, shift_labels=True)),
    ("token_kernel", "bfloat16", dict(B=2, T=3, V=1000), dict(mode="logps_bwd", kernel="single")),
    ("fused_linear_var_loss", "float32", dict(B=3, T=11, H=33, V=1001), {}),
]


def test_parity_part_runs_and_stops_on_a_mismatch(monkeypatch, capsys):
    """Part 1's checks on CPU tensors in the interpreter (as tests/ run the kernels), then with
    fused_var_loss's loss off by 1e-4 relative: the suite must stop at that case."""
    assert gpu_suite.run_parity(SMALL_CASES, device="cpu")
    import varkernels

    real = varkernels.fused_var_loss

    def off(*args, **kwargs):
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * (1 + 1e-4))

    monkeypatch.setattr(varkernels, "fused_var_loss", off)
    assert not gpu_suite.run_parity(SMALL_CASES, device="cpu")
    text = capsys.readouterr().out
    assert "MISMATCH fused_var_loss float32" in text and "[2/" not in text.split("MISMATCH")[1]


def test_every_parity_case_is_well_formed():
    ops = {"fused_var_loss", "sequence_logps", "token_kernel", "fused_linear_var_loss"}
    cases = gpu_suite.parity_cases()
    assert {c[0] for c in cases} == ops
    assert {c[1] for c in cases} == {"float32", "bfloat16", "float16"}
    assert {c[2]["V"] for c in cases if c[0] == "fused_var_loss"} >= {1000, 32003, 128256}
    assert {c[3]["kernel"] for c in cases if c[0] == "token_kernel"} == {"single", "tiled"}


def _row(provider, median, est=""):
    return {"part": "time", "form": "linear", "head": "llama3-8b", "tokens": 8192, "dtype": "bfloat16",
            "provider": provider, "status": "ok", "median_ms": str(median), "p20_ms": str(median * 0.9),
            "p80_ms": str(median * 1.1), "peak_extra_bytes": "4.2e8", "est_ms": est, "gpu": "H100 (test rows)"}


def test_roofline_estimates_from_a_cost_model_csv(tmp_path):
    path = tmp_path / "cost_model.csv"
    assert gpu_suite.read_roofline(path, "sm_90") == []  # no CSV: n/a
    assert gpu_suite.roofline_estimate([], "sm_90", provider="naive") == (None, "n/a")
    path.write_text(
        "provider,form,H,V,tokens,dtype,gpu,est_us_sm_90,est_ms\n"
        "varkernels[triton],linear,4096,128256,8192,bfloat16,H100 SXM,5100,\n"
        "varkernels[triton],linear,4096,128256,8192,bfloat16,A100,,9.5\n"
        "naive,linear,4096,128256,8192,bfloat16,,,12.5\n"
    )
    rows = gpu_suite.read_roofline(path, "sm_90")
    assert len(rows) == 2  # the A100 row is not an estimate for sm_90
    key = dict(form="linear", H=4096, V=128256, tokens=8192, dtype="bfloat16")
    est, col = gpu_suite.roofline_estimate(rows, "sm_90", provider="varkernels[triton]", **key)
    assert est == pytest.approx(5.1) and col == "est_us_sm_90"
    assert gpu_suite.roofline_estimate(rows, "sm_90", provider="naive", **key) == (12.5, "est_ms")
    assert gpu_suite.roofline_estimate(rows, "sm_90", provider="liger[flce]", **key) == (None, "n/a")
    assert gpu_suite.roofline_estimate(rows, "sm_90", provider="naive", **{**key, "tokens": 32768})[0] is None


def test_table_and_plot(tmp_path):
    rows = [_row("varkernels[triton]", 6.0, "5.1"), _row("naive", 20.0),
            {**_row("liger[flce]", 0), "status": "oom"}]
    text = gpu_suite.table(rows)
    lines = text.splitlines()
    assert "est. ms" in lines[0]
    assert any("varkernels[triton]" in ln and "5.1" in ln and "1.18" in ln for ln in lines), text
    assert any("naive" in ln and "n/a" in ln for ln in lines) and any("oom" in ln for ln in lines)
    assert "ESTIMATE" in text
    png = tmp_path / "suite.png"
    gpu_suite.plot(rows, png)
    assert png.stat().st_size > 1000


def test_provider_selection():
    names = ["naive", "torch.compile(naive)", "varkernels[triton]", "liger[flce]", "cce[cce]", "cce[torch_compile]"]
    assert gpu_suite.select_providers(names, None) == ["naive", "varkernels[triton]", "liger[flce]", "cce[cce]"]
    assert gpu_suite.select_providers(names, ["all"]) == names
    assert gpu_suite.select_providers(names, ["naive", "cce"]) == ["naive", "cce[cce]", "cce[torch_compile]"]
