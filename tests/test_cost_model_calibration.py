"""The cost model against published GPU measurements at their shapes (values and sources:
tests/data/cost_model_calibration.json). A roofline at datasheet peaks is a lower bound, so measured /
estimated is expected at or above 1; what the test guards is that a change to the model (device table,
roofline, a provider's counted or traced algorithm) does not move a ratio further from 1 than recorded,
and that memory stays within 1% of the published figure."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cost_model  # noqa: E402

from varkernels.testing import costmodel as cm  # noqa: E402

DATA = json.loads((Path(__file__).parent / "data" / "cost_model_calibration.json").read_text())
POINTS = {p["id"]: p for p in DATA["points"]}
TIME_SLACK = 0.02  # |log ratio| may grow by at most this (2%) before the test calls the model worse
MEMORY_TOL = 0.01
MIB = 2**20


class _Shape:
    def __init__(self, tokens, V, H=0):
        self.tokens, self.V, self.H = tokens, V, H


def predict(point) -> tuple:
    """(estimated ms, predicted MiB as the source reports memory) of one point."""
    s, gpu = point["shape"], cm.GPUS[point["gpu"]]
    if point["provider"] == "cce[cce]":
        case = cost_model.Case(s["head"], s["tokens"], False)
        assert (case.H, case.V) == (s["H"], s["V"]), "the head's shape in benchmarks/cost_model.py changed"
        tr = cost_model.count_cce(case)
        return tr.estimate_seconds(gpu) * 1e3, (tr.returned_bytes + tr.peak_extra_bytes) / MIB
    if point["provider"] == "liger[ce]":
        tr = cost_model.count_liger_ce(_Shape(s["tokens"], s["V"]), elem_bytes=4, per_token_grad=False,
                                       accumulate_into_grad=True)
        inputs = s["tokens"] * s["V"] * 4 + s["tokens"] * 8  # fp32 logits, int64 targets
        return tr.estimate_seconds(gpu) * 1e3, (inputs + tr.peak_extra_bytes) / MIB
    raise ValueError(point["provider"])


@pytest.mark.parametrize("pid", list(POINTS))
def test_cost_model_against_published_measurements(pid):
    point = POINTS[pid]
    if point.get("skip"):
        pytest.skip(f"{pid}: {point['skip']}")
    est_ms, mem_mib = predict(point)
    ratio = point["published"]["time_ms"] / est_ms
    recorded = point["recorded"]["time_ratio"]
    assert abs(math.log(ratio)) <= abs(math.log(recorded)) + TIME_SLACK, (
        f"{pid}: measured/estimated time {ratio:.3f} (published {point['published']['time_ms']} ms, estimate "
        f"{est_ms:.2f} ms) is further from 1 than the recorded {recorded}: the change makes the model worse here "
        f"(if it makes it better, update 'recorded' in tests/data/cost_model_calibration.json)")
    assert abs(mem_mib / point["published"]["memory_mib"] - 1) <= MEMORY_TOL, (
        f"{pid}: predicted {mem_mib:.1f} MiB against the published {point['published']['memory_mib']} MiB")


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
