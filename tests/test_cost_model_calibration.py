"""The cost model against published GPU measurements at their shapes (values and sources:
tests/data/cost_model_calibration.json). A roofline at datasheet peaks is a lower bound, so measured /
estimated is expected at or above 1; what the test guards is that a change to the model (device table,
roofline, a provider's counted or traced algorithm) does not move a ratio further from 1 than recorded,
and that memory stays within 1% of the published figure where the source says what its memory counts (a point
whose memory cannot be compared honestly gives the reason in 'memory_skip'; its time is still compared)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from tools import cost_providers as cost_model  # noqa: E402
from tools import costmodel as cm  # noqa: E402

DATA = json.loads((Path(__file__).parent / "data" / "cost_model_calibration.json").read_text())
POINTS = {p["id"]: p for p in DATA["points"]}
TIME_SLACK = 0.02  # |log ratio| may grow by at most this (2%) before the test calls the model worse
MEMORY_TOL = 0.01
MIB = 2**20
GIB = 2**30


class _Shape:
    def __init__(self, tokens, V, H=0):
        self.tokens, self.V, self.H = tokens, V, H
        self.master, self.T = False, tokens // cost_model.B


def predict(point) -> tuple:
    """(estimated ms, predicted MiB as the source reports memory, or None where it cannot be compared)."""
    s, gpu = point["shape"], cm.GPUS[point["gpu"]]
    if point["provider"] == "cce[cce]":
        if "head" in s:  # a head of the cost model's table (tools/cost_providers.py)
            case = cost_model.Case(s["head"], s["tokens"], False)
            assert (case.H, case.V) == (s["H"], s["V"]), "the head's shape in tools/cost_providers.py changed"
        else:
            case = _Shape(s["tokens"], s["V"], s["H"])
        tr = cost_model.count_cce(case)
        return tr.estimate_seconds(gpu) * 1e3, (tr.returned_bytes + tr.peak_extra_bytes) / MIB
    if point["provider"] == "liger[ce]":
        tr = cost_model.count_liger_ce(_Shape(s["tokens"], s["V"]), elem_bytes=4, per_token_grad=False,
                                       accumulate_into_grad=True)
        inputs = s["tokens"] * s["V"] * 4 + s["tokens"] * 8  # fp32 logits, int64 targets
        return tr.estimate_seconds(gpu) * 1e3, (inputs + tr.peak_extra_bytes) / MIB
    if point["provider"] == "naive[cross_entropy]":
        tr = cost_model.trace_naive_ce(_Shape(s["tokens"], s["V"], s["H"]), upcast=True)
        return tr.estimate_seconds(gpu) * 1e3, None
    if point["provider"] == "liger[flce]":
        tr = cost_model.count_liger_flce(_Shape(s["tokens"], s["V"], s["H"]), reduction="mean", accum_fp32=False)
        return tr.estimate_seconds(gpu) * 1e3, None
    if point["provider"] == "three_gemms":
        return cm.three_gemms(s["tokens"], s["H"], s["V"]).estimate_seconds(gpu) * 1e3, None
    raise ValueError(point["provider"])


def _published_mib(point) -> float:
    pub = point["published"]
    if "memory_mib" in pub:
        return pub["memory_mib"]
    if "memory_gib" in pub:
        return pub["memory_gib"] * GIB / MIB
    raise ValueError(f"{point['id']}: published memory in {sorted(pub)}: only MiB or GiB can be compared (a 'GB' "
                     f"whose unit the source does not state needs a 'memory_skip')")


@pytest.mark.parametrize("pid", list(POINTS))
def test_cost_model_time_against_published_measurements(pid):
    point = POINTS[pid]
    if point.get("skip"):
        pytest.skip(f"{pid}: {point['skip']}")
    est_ms, _ = predict(point)
    ratio = point["published"]["time_ms"] / est_ms
    recorded = point["recorded"]["time_ratio"]
    assert abs(math.log(ratio)) <= abs(math.log(recorded)) + TIME_SLACK, (
        f"{pid}: measured/estimated time {ratio:.3f} (published {point['published']['time_ms']} ms, estimate "
        f"{est_ms:.2f} ms) is further from 1 than the recorded {recorded}: the change makes the model worse here "
        f"(if it makes it better, update 'recorded' in tests/data/cost_model_calibration.json)")


@pytest.mark.parametrize("pid", list(POINTS))
def test_cost_model_memory_against_published_measurements(pid):
    point = POINTS[pid]
    if point.get("skip"):
        pytest.skip(f"{pid}: {point['skip']}")
    if point.get("memory_skip"):
        pytest.skip(f"{pid}: memory not compared: {point['memory_skip']}")
    _, mem_mib = predict(point)
    assert mem_mib is not None, f"{pid}: the model gives no memory figure; say why in 'memory_skip'"
    published = _published_mib(point)
    assert abs(mem_mib / published - 1) <= MEMORY_TOL, (
        f"{pid}: predicted {mem_mib:.1f} MiB against the published {published} MiB")


def test_recorded_ratios_are_the_current_model():
    """The recorded ratios are what the model gives today (to 1%): a better model must update them, so that
    the test keeps guarding the new level."""
    for pid, point in POINTS.items():
        if point.get("skip"):
            continue
        est_ms, _ = predict(point)
        ratio = point["published"]["time_ms"] / est_ms
        assert ratio == pytest.approx(point["recorded"]["time_ratio"], rel=0.01), (pid, ratio)


def test_every_point_names_its_source():
    for pid, point in POINTS.items():
        assert point["source"] and point["gpu"] in cm.GPUS or point.get("skip"), pid


def test_liger_flce_variants_count_the_published_passes():
    """reduction="mean" is one pass (3 GEMMs a chunk, no per-token scaling); "none" adds the forward's
    loss-only GEMM and the scaling; the bf16 accumulator halves the accumulation's bytes and drops the cast."""
    c = _Shape(8192, 151936, 4096)
    chunks = 8192 // 256

    def names(tr):
        return [op.name for op in tr.ops]

    mean = cost_model.count_liger_flce(c, reduction="mean", accum_fp32=False)
    none = cost_model.count_liger_flce(c)
    assert len(mean.gemms()) == 3 * chunks and len(none.gemms()) == 4 * chunks
    assert not any("token_grad_output" in n for n in names(mean))
    assert sum("token_grad_output" in n for n in names(none)) == chunks
    assert "grad_weight.to(bf16)" in names(none) and "grad_weight.to(bf16)" not in names(mean)
    acc16 = [op for op in mean.ops if op.name.startswith("grad_W +=")][0]
    acc32 = [op for op in none.ops if op.name.startswith("grad_W +=")][0]
    assert acc32.writes == 2 * acc16.writes == 151936 * 4096 * 4
    with pytest.raises(ValueError, match="reduction"):
        cost_model.count_liger_flce(c, reduction="sum")
