"""benchmarks/gpu_measures.py costs each compile arch's roofline as the GPU it names (no GPU needed): the
cost model's datasheet entries by default, the named device's entry in its arch's place (the H200 is sm_90 like
the H100), and a GPU suite run's measured rates when its calibration rows are given."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_measures  # noqa: E402
import gpu_suite  # noqa: E402

from tools import costmodel as cm  # noqa: E402


def test_default_is_the_datasheet_per_arch():
    gpus = gpu_measures.assumed_gpus()
    assert gpus == {"sm_80": cm.A100_SXM, "sm_90": cm.H100_SXM}


@pytest.mark.parametrize("name, arch, gpu", [
    ("NVIDIA H200", "sm_90", cm.H200_SXM),
    ("NVIDIA H100 80GB HBM3", "sm_90", cm.H100_SXM),
    ("NVIDIA A100 80GB PCIe", "sm_80", cm.A100_PCIE),
    ("NVIDIA A100-SXM4-80GB", "sm_80", cm.A100_SXM),
])
def test_the_named_device_takes_its_arch(name, arch, gpu):
    gpus = gpu_measures.assumed_gpus(name)
    assert gpus[arch] == gpu
    other = {"sm_80": "sm_90", "sm_90": "sm_80"}[arch]
    assert gpus[other] == gpu_measures.GPUS[other]  # the other arch keeps its default


def test_h200_is_not_costed_as_h100():
    assert gpu_measures.assumed_gpus("NVIDIA H200")["sm_90"].dram_bytes_per_s == 4.8e12 != \
        gpu_measures.GPUS["sm_90"].dram_bytes_per_s


def test_unknown_device_names_the_argument():
    with pytest.raises(ValueError, match=r"device_name: .*H200 SXM.*got 'NVIDIA L40S'"):
        gpu_measures.assumed_gpus("NVIDIA L40S")
    with pytest.raises(ValueError, match="device_name"):
        gpu_measures.assumed_gpus(None, [{"part": "calibrate"}])


def _calibration_rows(run, gpu, flops, copy):
    base = {"run": run, "gpu": gpu, "arch": "sm_90", "part": "calibrate", "status": "ok"}
    return [{**base, "provider": "torch.mm bf16 8192^3", "rate": f"{flops:.6g}", "rate_unit": "FLOP/s"},
            {**base, "provider": "copy_ 1 GiB fp32", "rate": f"{copy:.6g}", "rate_unit": "bytes/s (read + write)"}]


def test_calibration_rows_give_the_measured_rates(tmp_path):
    rows = (_calibration_rows("r1", "NVIDIA H200", 700e12, 4.0e12)
            + [{"run": "r2", "gpu": "NVIDIA H200", "part": "time", "status": "ok"}]
            + _calibration_rows("r2", "NVIDIA H200", 780e12, 4.3e12))
    path = tmp_path / "gpu_suite.csv"
    with open(path, "w", newline="") as f:  # as the suite writes its CSV
        w = csv.DictWriter(f, fieldnames=gpu_suite.FIELDS, restval="")
        w.writeheader()
        w.writerows(rows)
    name, cal = gpu_measures.calibration_of(gpu_suite.read_rows(path))
    assert name == "NVIDIA H200" and {r["run"] for r in cal} == {"r2"}  # the last run's calibration
    gpu = gpu_measures.assumed_gpus(name, cal)["sm_90"]
    assert gpu.dram_bytes_per_s == pytest.approx(4.3e12) and gpu.peak_flops["bf16"] == pytest.approx(780e12)
    assert "measured" in gpu.name and "measured" in gpu.source
    with pytest.raises(ValueError, match="calibration: .*'NVIDIA H100'"):
        gpu_measures.calibration_of(gpu_suite.read_rows(path), "NVIDIA H100")
    with pytest.raises(ValueError, match="calibration_rows"):
        gpu_measures.assumed_gpus("NVIDIA H200", cal[:1])  # no copy bandwidth


@pytest.mark.parametrize("detected, sm90, bw90", [("NVIDIA H200", "H200 SXM", 4.8e12),
                                                   ("NVIDIA L40S", "H100 SXM", 3.35e12)])
def test_main_costs_the_detected_device(tmp_path, monkeypatch, capsys, detected, sm90, bw90):
    """The script end to end at a tiny shape, the CUDA device's name faked (cubins not compiled): a device of the
    table is costed as itself, one outside it leaves the datasheet defaults (and says so)."""
    monkeypatch.setattr(gpu_measures, "cuda_device_name", lambda: detected)
    monkeypatch.setattr(gpu_measures.aot, "cuobjdump_path", lambda: None)
    out = tmp_path / "gm.csv"
    gpu_measures.main(["--B", "2", "--T", "8", "--V", "64", "--dtypes", "float32", "--csv", str(out)])
    text = capsys.readouterr().out
    assert f"sm_90 → {sm90} {bw90 / 1e12:.2f} TB/s" in text
    assert ("not in the cost model's table" in text) == (detected == "NVIDIA L40S")
    with open(out, newline="") as f:
        rows = {r["arch"]: r for r in csv.DictReader(f)}
    assert rows["sm_90"]["assumed_gpu"] == sm90 and rows["sm_80"]["assumed_gpu"] == "A100 SXM"
    for arch, bw in (("sm_90", bw90), ("sm_80", 2.0e12)):
        r = rows[arch]
        assert float(r["assumed_bandwidth_Bps"]) == bw
        assert float(r["est_fused_us"]) == pytest.approx(float(r["fused_bytes"]) / bw * 1e6)
