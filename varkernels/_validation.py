"""Option names and input validation for every varkernels op (the one place checks live).

A leaf module: it imports nothing of varkernels, so every layer (the ops, the VAR layer, the
reference, the training side) can use the same rules. The shape rules of rewards / ref_logps
(:func:`pair_form`, :func:`check_pair_inputs`), the option checks (:func:`check_option`,
:func:`check_options`: every keyword option of the ops by name) and the type-and-range checks they are
made of (:func:`check_bool`, :func:`check_int`, :func:`check_positive`, :func:`check_positive_int`)
exist here once. They return the value normalised (a numpy scalar as the Python one), because the
operators' schemas take no numpy types.

Validation follows docs/design.md §2: each bad input raises ``ValueError`` / ``TypeError`` that names the
argument, what was expected and what was given, and nothing of the caller's is modified before
the error is raised (all checks run before any kernel touches memory).

Data-dependent checks (labels in range, NaN/+inf in rewards and ref_logps) need one host
synchronisation. They are gathered into a single ``.tolist()`` so a loss call costs one sync,
on tensors that are tiny next to the logits (labels: B·T ints; rewards/ref_logps: B² floats).
They run in eager mode only: under ``torch.compile`` and on fake tensors (which have no data)
they are skipped (:func:`data_checks_enabled`). The C++ kernel still rejects out-of-range labels
there; the Triton and PyTorch paths do not.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

WEIGHTINGS = ("posterior", "importance")
REDUCTIONS = ("mean", "sum")
LOGP_REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "cpu", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONSTANT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # rewards, ref_logps, weights


class VAROutput(NamedTuple):
    """Result of a VAR loss call with ``return_aux=True``.

    Attributes:
        loss: [] float32 scalar, ``-(1/B) * sum_i w_i * s_i``; differentiable w.r.t. the policy.
        weights: [k·B] float32, the stop-gradient weights ``w_i``.
        log_z: [k·B] float32, ``log Ẑ_i = logsumexp_j A[i, j] - log B`` (within i's group).
        policy_logps: [k·B] float32, the sequence log-probs ``s_i`` (detached).
        ess: [] float32, effective sample size ``(Σw)² / Σw²`` of each group's weights, in [1, B],
            averaged over the k groups.
    """

    loss: torch.Tensor
    weights: torch.Tensor
    log_z: torch.Tensor
    policy_logps: torch.Tensor
    ess: torch.Tensor


class OptionTypeError(TypeError, ValueError):
    """An option of the wrong type: a ``TypeError``, and a ``ValueError`` too because :func:`check_positive_int`
    and :func:`check_option` raised ``ValueError`` for every bad value before types were told apart (the
    training side and its callers still catch that)."""


FP32_MAX = torch.finfo(torch.float32).max  # 3.4e38
FP32_TINY = torch.finfo(torch.float32).tiny  # 1.2e-38, the smallest normal float32; 1/FP32_TINY < FP32_MAX
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _numpy_kind(value) -> Optional[str]:
    """The dtype kind of a numpy scalar ('b' bool, 'i'/'u' int, 'f' float, ...), None for anything else.

    numpy is not imported: a numpy scalar is recognised by its module, so this costs nothing without numpy."""
    if type(value).__module__ != "numpy" or getattr(value, "ndim", None) != 0:
        return None
    return getattr(getattr(value, "dtype", None), "kind", None)


def _given(value) -> str:
    """``'False' (str)``: the value and its type, for the messages of wrong option types."""
    return f"{value!r} ({type(value).__name__})"


def check_option(name: str, value, allowed) -> None:
    """``value`` is one of the strings ``allowed`` (OptionTypeError for a non-string, ValueError otherwise)."""
    if value not in allowed:
        exc = ValueError if isinstance(value, str) else OptionTypeError
        raise exc(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """``value`` is a bool: ``True``/``False`` or a ``numpy.bool_``; returned as a Python bool.

    Nothing else is taken for one — not the ints 0/1, not the strings "False"/"yes" (truthy: ``inplace="False"``
    would overwrite the logits), not a 0-dim bool tensor (reading it would be a host sync; pass ``t.item()``)."""
    if isinstance(value, bool):
        return value
    if _numpy_kind(value) == "b":
        return bool(value)
    hint = ": pass a Python bool (t.item())" if isinstance(value, torch.Tensor) else ""
    raise TypeError(f"{name} must be a bool, got {_given(value)}{hint}")


def check_int(name: str, value, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """``value`` is an int (a numpy integer is one; a bool or a float is not) in [low, high] (default: int64,
    what the operators take); returned as a Python int. TypeError for another type, ValueError out of range."""
    if isinstance(value, bool) or not (isinstance(value, int) or _numpy_kind(value) in ("i", "u")):
        raise TypeError(f"{name} must be an int, got {_given(value)}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value}")
    return value


def check_positive_int(name: str, value, allow_none: bool = False, high: int = INT64_MAX):
    """``value`` is an int >= 1 (a numpy integer is one; a bool is not) and <= ``high`` (default: int64, what
    the operators take), or None when ``allow_none``; returned as a Python int (or None).

    A wrong type raises :class:`OptionTypeError` (a TypeError that is also the ValueError this raised before)."""
    if value is None and allow_none:
        return None
    kind = f"a positive int{' or None' if allow_none else ''}"
    if isinstance(value, bool) or not (isinstance(value, int) or _numpy_kind(value) in ("i", "u")):
        raise OptionTypeError(f"{name} must be {kind}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    if value > high:
        raise ValueError(f"{name} must be a positive int <= {high} (int64, what the operators take), got {value!r}")
    return int(value)


def check_positive(name: str, value, allow_none: bool = False):
    """``value`` is a real number in [FP32_TINY, FP32_MAX] = [1.2e-38, 3.4e38], or None when ``allow_none``.

    An int or a numpy number is one; a bool, a string or a tensor is not (TypeError). The range is where the
    value and its inverse are normal float32 numbers: the kernels compute in float32 with 1/temperature,
    1/beta and 1/softcap, so a value outside it would make a loss of NaN from finite inputs (ValueError).
    Returned as given (a Python number) or as a float (a numpy number)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or _numpy_kind(value) in ("i", "u", "f")):
        raise TypeError(f"{name} must be a Python number > 0, got {type(value).__name__} {value!r}")
    if not (value > 0) or value == math.inf:  # NaN fails the first test; comparisons trace under compile
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not FP32_TINY <= value <= FP32_MAX:
        raise ValueError(
            f"{name} must be in [{FP32_TINY:.4g}, {FP32_MAX:.4g}] (it and 1/{name} must be normal float32 "
            f"numbers: the kernels compute in float32), got {value!r}; "
            + _RANGE_REMEDIES.get(name, "use a value in that range")
        )
    return value if isinstance(value, (int, float)) else float(value)


_RANGE_REMEDIES = {
    "beta": "rescale the rewards instead (r/beta is what counts: divide both by the same factor)",
    "temperature": "rescale the logits instead (logits/temperature is what counts)",
    "softcap": "use softcap=None for no cap",
}
BOOL_OPTIONS = ("shift_labels", "inplace", "return_aux", "return_entropy")
OPTION_VALUES = {"weighting": WEIGHTINGS, "logp_reduction": REDUCTIONS, "reduction": REDUCTIONS, "backend": BACKENDS}


def check_options(**options) -> dict:
    """Check the keyword options of the ops by name and return them normalised (numpy scalars as Python ones):
    ``weighting``, ``logp_reduction``, ``reduction``, ``backend`` (one of their strings); ``beta``,
    ``temperature`` (numbers > 0, :func:`check_positive`), ``softcap`` (the same or None); ``chunk_size`` (a
    positive int64 or None); ``ignore_index`` (an int64); ``shift_labels``, ``inplace``, ``return_aux``,
    ``return_entropy`` (bools, :func:`check_bool`). Other names are not options of the ops (TypeError)."""
    out = {}
    for name, value in options.items():
        if name in OPTION_VALUES:
            check_option(name, value, OPTION_VALUES[name])
        elif name in ("beta", "temperature", "softcap"):
            value = check_positive(name, value, allow_none=name == "softcap")
        elif name == "chunk_size":
            value = check_positive_int(name, value, allow_none=True)
        elif name == "ignore_index":
            value = check_int(name, value)
        elif name in BOOL_OPTIONS:
            value = check_bool(name, value)
        else:
            raise TypeError(f"check_options: {name!r} is not a checked option")
        out[name] = value
    return out


def _check_tensor(name: str, t, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    k0, v0 = items[0]
    for k, v in items[1:]:
        if v.device != v0.device:
            raise ValueError(
                f"{k} must be on the same device as {k0} ({v0.device}), got {v.device}"
            )


def check_policy_inputs(
    logits_name: str, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int
) -> None:
    """Static checks of logits/hidden ([B, T, *]) against labels ([B, T])."""
    _check_tensor(logits_name, logits, FLOAT_DTYPES)
    _check_tensor("labels", labels, (torch.int64, torch.int32))
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must have shape [B, T, *] (3 dims), got {tuple(logits.shape)}")
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape [B, T], got {tuple(labels.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"labels must have shape [B, T] = {tuple(logits.shape[:2])} to match {logits_name}, "
            f"got {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0 or logits.shape[1] == 0 or vocab_size == 0:
        raise ValueError(f"{logits_name} must be non-empty, got shape {tuple(logits.shape)}")


def pair_form(name: str, t: torch.Tensor, rows: int) -> tuple[int, int, bool]:
    """(k, B, cross_pairs) of rewards or ref_logps ``t`` for ``rows`` = k·B policy rows; ValueError otherwise.

    [B, B] / [k, B, B]: cross-pair; [B] / [k, B]: shared context. A 2-D [a, b] tensor is cross-pair when
    a = b = rows, shared-context when a·b = rows.
    """
    shape = tuple(t.shape)
    if len(shape) == 1 and shape[0] == rows:
        return 1, rows, False
    if len(shape) == 2 and shape == (rows, rows):
        return 1, rows, True
    if len(shape) == 2 and shape[0] * shape[1] == rows and shape[1] > 0:
        return shape[0], shape[1], False
    if len(shape) == 3 and shape[1] == shape[2] and shape[0] * shape[1] == rows and shape[1] > 0:
        return shape[0], shape[1], True
    raise ValueError(
        f"{name} must have shape (B, B) = {(rows, rows)} or (B,) = {(rows,)} for one group of the "
        f"{rows} rows, or (k, B, B) / (k, B) with k*B = {rows} for k groups; got {shape}"
    )


def check_pair_inputs(
    rewards: torch.Tensor, ref_logps: torch.Tensor, rows: int, groups: Optional[int] = None
) -> tuple[int, int, bool]:
    """Static checks of rewards/ref_logps against ``rows`` = k·B policy rows; returns (k, B, cross_pairs).

    Accepted shapes (k groups of B; k = 1 may drop its leading dimension): cross-pair [B, B] or
    [k, B, B]; shared-context [B] or [k, B] (:func:`pair_form`). ``groups``: k is known (a dataset of
    k groups) and the leading group dimension is required.
    """
    _check_tensor("rewards", rewards, CONSTANT_DTYPES)
    _check_tensor("ref_logps", ref_logps, CONSTANT_DTYPES)
    if groups is not None and (rewards.dim() not in (2, 3) or rewards.shape[0] != groups):
        raise ValueError(
            f"rewards must have shape [k, B, B] or [k, B] with k = {groups} groups, got {tuple(rewards.shape)}"
        )
    form = pair_form("rewards", rewards, rows)
    if pair_form("ref_logps", ref_logps, rows) != form or rewards.shape != ref_logps.shape:
        raise ValueError(
            "rewards and ref_logps must have the same shape (both cross-pair or both shared-context); "
            f"got rewards {tuple(rewards.shape)} and ref_logps {tuple(ref_logps.shape)}"
        )
    return form


def importance_overflow_message(weighting: str) -> str:
    """The FloatingPointError text of non-finite VAR weights (the kernels and the reference raise it)."""
    return (
        f"VAR weights are not finite (weighting={weighting!r}): exp(R[i,i]/beta - log Z_i) "
        "overflowed float32. With sequence-summed ref log-probs log Z_i is very negative, so "
        "importance weights are unbounded. Use logp_reduction='mean' for ref_logps and the "
        "policy, weighting='posterior' (bounded by B), or a larger beta."
    )


def check_weights(weights: torch.Tensor, labels_shape: tuple) -> None:
    """Static checks of the weights of a weighted NLL: [N] or [N, T] like labels, a float constant.

    A weight that requires grad is an error: no gradient flows into the weights (the gradient of
    the policy is computed in the forward from their values), so silently dropping one would hide
    a bug in the caller's graph.
    """
    _check_tensor("weights", weights, CONSTANT_DTYPES)
    N, T = labels_shape
    if tuple(weights.shape) not in ((N,), (N, T)):
        raise ValueError(
            f"weights must have shape [N] = {(N,)} (per sequence) or [N, T] = {(N, T)} (per token, like labels), "
            f"got {tuple(weights.shape)}"
        )
    if weights.requires_grad:
        raise ValueError(
            "weights must be a constant: no gradient flows into them, got a tensor that requires grad; "
            "pass weights.detach()"
        )


def check_inplace(logits: torch.Tensor, inplace: bool) -> None:
    """inplace=True writes the gradient over the logits: their elements must not share memory."""
    if inplace and any(st == 0 and n > 1 for st, n in zip(logits.stride(), logits.shape)):
        raise ValueError(
            "inplace=True needs logits whose elements do not share memory; got strides "
            f"{tuple(logits.stride())} for shape {tuple(logits.shape)} (an expand()ed view): pass "
            "logits.contiguous() or use inplace=False"
        )


def data_checks_enabled(*tensors) -> bool:
    """False under ``torch.compile`` and for fake or meta tensors: data checks need real values and a sync."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not any(t is not None and (t.device.type == "meta" or is_fake(t)) for t in tensors)


def check_values(
    labels: torch.Tensor,
    vocab_size: int,
    ignore_index: int,
    rewards: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
) -> None:
    """Data-dependent checks, one host sync for all of them (eager mode only, see the module docstring)."""
    if not data_checks_enabled(labels, rewards, ref_logps, weights):
        return
    bad_label = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    flags = {"labels": bad_label.any()}
    if weights is not None:
        flags["weights"] = ~torch.isfinite(weights).all()
    if rewards is not None:
        flags["rewards"] = ~torch.isfinite(rewards).all()
        flags["ref_logps"] = torch.isnan(ref_logps).any() | (ref_logps == math.inf).any()
        # A row whose every pair is impossible (all ref_logps = -inf) has Ẑ_i = 0: w_i undefined.
        flags["impossible_row"] = torch.isneginf(ref_logps).all(dim=-1).any()
    bad = dict(zip(flags, torch.stack(list(flags.values())).tolist()))
    if bad["labels"]:
        idx = bad_label.nonzero()[0].tolist()
        raise ValueError(
            f"labels must be in [0, V) = [0, {vocab_size}) or ignore_index={ignore_index}; "
            f"got {labels[tuple(idx)].item()} at index {tuple(idx)}"
        )
    if bad.get("weights"):
        raise ValueError("weights must be finite; got NaN or ±inf")
    if bad.get("rewards"):
        raise ValueError("rewards must be finite; got NaN or ±inf")
    if bad.get("ref_logps"):
        raise ValueError("ref_logps must not be NaN or +inf (-inf is allowed: an impossible response)")
    if bad.get("impossible_row"):
        raise ValueError(
            "ref_logps has a row whose every entry is -inf: no response is possible under that "
            "prompt, so its partition function is 0 and its weight is undefined"
        )


def shift_left(t: torch.Tensor, fill) -> torch.Tensor:
    """[B, T] → [B, T] with out[:, t] = t[:, t+1] and the last position ``fill`` (a copy)."""
    out = torch.full_like(t, fill)
    out[:, :-1] = t[:, 1:]
    return out


def shifted_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Hugging Face causal shift: position t predicts labels[:, t+1]; the last predicts nothing.

    Only the [B, T] labels are copied; logits / hidden states are never moved. Per-token weights of the
    weighted NLL shift the same way (``shift_left(weights, 0)``).
    """
    return shift_left(labels, ignore_index)


def check_linear(hidden, weight, bias, grad_accum_dtype=torch.float32) -> None:
    """Static checks of the fused-linear operands: hidden [B, T, H], weight [V, H] (V >= 1), bias [V] or None,
    and the accumulator dtype of the chunked driver (chunk_size is an option: :func:`check_options`)."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must be non-empty: [V, H] with V >= 1 vocabulary rows, got {tuple(weight.shape)}")
    if hidden.dim() != 3 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden must have shape [B, T, H] with H = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )
    # mixed float dtypes are fine: the GEMMs run in one dtype (core.autograd.head_dtype), gradients come back in each
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {got}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
    if grad_accum_dtype not in (torch.float32, weight.dtype):
        raise ValueError(
            f"grad_accum_dtype must be torch.float32 or the weight's dtype ({weight.dtype}), got {grad_accum_dtype!r}"
        )
    check_same_device(hidden=hidden, weight=weight, bias=bias)
