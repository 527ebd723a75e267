"""Bad inputs of the VAR losses (docs/design.md §2.4), shared by tests/test_validation.py and
tests/test_weighted_nll.py: a valid call, one edit per case that breaks exactly one thing, and the check
that nothing of the caller's was touched when the call raised.
"""

from __future__ import annotations

import torch
from helpers import IGNORE_INDEX, make_labels, make_logits, make_pairs

B, T, V = 3, 5, 50


def valid_call() -> dict:
    """Keyword arguments of a valid call; every case below breaks exactly one thing."""
    labels = make_labels(B, T, V)
    rewards, ref_logps = make_pairs(labels)
    logits = make_logits(B, T, V, labels=torch.where(labels == IGNORE_INDEX, 0, labels))
    return dict(logits=logits, labels=labels, rewards=rewards, ref_logps=ref_logps)


def _set(key, value):
    return lambda kw: kw.update({key: value(kw) if callable(value) else value})


def _poke(key, index, value):
    def edit(kw):
        t = kw[key].detach().clone()
        t[index] = value
        kw[key] = t.requires_grad_(kw[key].requires_grad)

    return edit


# (id, edit of the valid call, exception, pattern the message must match)
BAD_INPUTS = [
    # shapes
    ("labels-T", _set("labels", lambda kw: torch.zeros(B, T + 1, dtype=torch.long)), ValueError,
     r"labels.*\(3, 5\).*\(3, 6\)"),
    ("labels-B", _set("labels", lambda kw: torch.zeros(B + 1, T, dtype=torch.long)), ValueError,
     r"labels.*\(3, 5\).*\(4, 5\)"),
    ("labels-1d", _set("labels", lambda kw: torch.zeros(B * T, dtype=torch.long)), ValueError, r"labels.*\(15,\)"),
    ("logits-2d", _set("logits", lambda kw: kw["logits"].detach()[0].clone()), ValueError, r"logits.*\(5, 50\)"),
    ("logits-empty-T", _set("logits", lambda kw: torch.zeros(B, 0, V)), ValueError, r"logits"),
    ("rewards-B", _set("rewards", lambda kw: torch.zeros(B + 1)), ValueError, r"rewards.*\(3,\).*\(4,\)"),
    ("rewards-BxB1", _set("rewards", lambda kw: torch.zeros(B, B + 1)), ValueError, r"rewards.*\(3, 3\).*\(3, 4\)"),
    ("ref_logps-B", _set("ref_logps", lambda kw: torch.zeros(B + 1, B + 1)), ValueError,
     r"ref_logps.*\(3, 3\).*\(4, 4\)"),
    ("mixed-forms", _set("ref_logps", lambda kw: torch.zeros(B)), ValueError, r"rewards and ref_logps"),
    ("mixed-forms-2", _set("rewards", lambda kw: torch.zeros(B)), ValueError, r"rewards and ref_logps"),
    # label values
    ("label-eq-V", _poke("labels", (1, 3), V), ValueError, r"labels.*\[0, 50\).*got 50"),
    ("label-negative", _poke("labels", (2, 4), -1), ValueError, r"labels.*got -1"),
    ("label-other-ignore", lambda kw: kw.update(ignore_index=-1), ValueError, r"labels.*ignore_index=-1.*-100"),
    # scalars
    ("beta-zero", _set("beta", 0.0), ValueError, r"beta.*> 0.*0\.0"),
    ("beta-negative", _set("beta", -1.0), ValueError, r"beta"),
    ("beta-nan", _set("beta", float("nan")), ValueError, r"beta"),
    ("beta-inf", _set("beta", float("inf")), ValueError, r"beta"),
    ("beta-tensor", _set("beta", torch.tensor(1.0)), TypeError, r"beta"),
    ("beta-str", _set("beta", "1.0"), TypeError, r"beta"),
    ("temperature-zero", _set("temperature", 0.0), ValueError, r"temperature"),
    ("temperature-negative", _set("temperature", -0.7), ValueError, r"temperature"),
    ("softcap-zero", _set("softcap", 0.0), ValueError, r"softcap"),
    ("softcap-negative", _set("softcap", -30.0), ValueError, r"softcap"),
    # non-finite rewards / reference log-probs
    ("rewards-nan", _poke("rewards", (0, 1), float("nan")), ValueError, r"rewards"),
    ("rewards-posinf", _poke("rewards", (2, 2), float("inf")), ValueError, r"rewards"),
    ("ref_logps-nan", _poke("ref_logps", (1, 0), float("nan")), ValueError, r"ref_logps"),
    ("ref_logps-posinf", _poke("ref_logps", (0, 0), float("inf")), ValueError, r"ref_logps"),
    # a row of only −inf: Ẑ_i = 0, w_i undefined (a single −inf is legal, test_validation.py)
    ("ref_logps-all-minus-inf-row", _poke("ref_logps", 1, float("-inf")), ValueError, r"ref_logps.*-inf"),
    # option strings
    ("weighting", _set("weighting", "Posterior"), ValueError, r"weighting.*'posterior'.*'importance'.*'Posterior'"),
    ("logp_reduction", _set("logp_reduction", "none"), ValueError, r"logp_reduction.*'mean'.*'none'"),
    ("backend", _set("backend", "cuda"), ValueError, r"backend.*'triton'.*'cuda'"),
    # dtypes and types
    ("logits-float64", _set("logits", lambda kw: kw["logits"].detach().double()), TypeError, r"logits.*float64"),
    ("logits-int", _set("logits", lambda kw: torch.zeros(B, T, V, dtype=torch.int32)), TypeError, r"logits.*int32"),
    ("logits-list", _set("logits", lambda kw: kw["logits"].tolist()), TypeError, r"logits.*list"),
    ("labels-float", _set("labels", lambda kw: kw["labels"].float()), TypeError, r"labels.*float32"),
    ("labels-int16", _set("labels", lambda kw: kw["labels"].to(torch.int16)), TypeError, r"labels.*int16"),
    ("rewards-int", _set("rewards", lambda kw: torch.zeros(B, B, dtype=torch.long)), TypeError, r"rewards.*int64"),
    ("ref_logps-bool", _set("ref_logps", lambda kw: torch.zeros(B, B, dtype=torch.bool)), TypeError,
     r"ref_logps.*bool"),
    ("rewards-list", _set("rewards", lambda kw: kw["rewards"].tolist()), TypeError, r"rewards"),
    # devices (meta tensors stand in for a second device on a CPU-only machine)
    ("rewards-device", _set("rewards", lambda kw: torch.empty(B, B, device="meta")), ValueError,
     r"rewards.*device.*cpu.*meta"),
    ("labels-device", _set("labels", lambda kw: torch.empty(B, T, dtype=torch.long, device="meta")), ValueError,
     r"labels.*device.*cpu.*meta"),
]


def snapshot(kw: dict) -> dict:
    return {k: v.detach().clone() for k, v in kw.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def assert_untouched(kw: dict, before: dict) -> None:
    for k, old in before.items():
        new = kw[k]
        assert new.dtype == old.dtype and new.shape == old.shape, f"{k} changed dtype or shape"
        same = torch.equal(new.detach().reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8)) \
            if new.dtype.is_floating_point \
            else torch.equal(new.detach(), old)
        assert same, f"{k} was modified although the call raised"
        if k == "logits" and new.requires_grad:
            assert new.grad is None, "a gradient was written although the call raised"
