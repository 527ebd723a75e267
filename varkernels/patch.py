"""``patch_causal_lm``: a Hugging Face causal LM that computes its loss inside the output embedding.

    patch_causal_lm(model, *, strict=False, chunk_size=None, backend="auto") -> model    (in place, idempotent)
    unpatch_causal_lm(model) -> model

Afterwards ``model(input_ids, ..., labels=labels)`` runs the fused-linear loss inside ``lm_head``'s forward
(:meth:`LMHead.run_in_head <varkernels.training.lm_head.LMHead.run_in_head>`: the weight as the head sees
it, whole under FSDP2 / ZeRO-3, autocast's dtype, the config's ``final_logit_softcapping``) and returns the
model's output class with ``loss`` set and ``logits=None`` — no [B, T, V] logits are ever held:

- without ``loss_weights``: the model's own loss, Hugging Face's token mean of the cross-entropy over the
  batch (labels shifted as the model does, ``-100`` ignored); with ``num_items_in_batch`` (``Trainer``
  under gradient accumulation) the token sum divided by it. Computed as ``linear_weighted_nll`` with
  ``reduction="sum"`` and the per-sequence weight N / n (N rows, n target tokens of the batch).
- with ``loss_weights`` ([B] per sequence or [B, T] per token, aligned with ``labels``):
  ``linear_weighted_nll(..., loss_weights, reduction="mean", shift_labels=True)`` — e.g. VAR with
  ``loss_weights=var_weights(rewards, ref_logps)``. With ``num_items_in_batch`` (``Trainer``) it is scaled by
  the micro-batch's share of the accumulated batch's target tokens, so that the accumulated loss is the
  token-weighted average of the micro-batches' means (their mean when they hold as many tokens each).

Without ``labels`` the model runs exactly as unpatched (logits returned). The patch replaces the causal LM's
``forward`` by an instance attribute (a bound method, so ``copy.deepcopy`` binds it to the copy) and keeps
the one it replaced for ``unpatch_causal_lm``; wrappers (PEFT, DDP, DeepSpeed, FSDP2, ``torch.compile``)
are unwrapped to find the causal LM and still called as usual. The original forward is called from the
patched one, inside the root module's ``__call__`` (the engines' hooks on the root have fired).

Where the fused path does not apply (LoRA or another layer class on ``lm_head``, a ``logit_scale`` /
``logits_scaling`` in the config: ``LMHead.in_head`` is False), ``strict=True`` raises at patch time;
otherwise the call falls back to the model's logits, with one warning per model: the model's own loss
(``loss_weights``: ``weighted_nll`` on its logits, which already carry the softcap / scaling), logits
returned. The check is repeated at every call, so a head replaced after patching (PEFT) is seen.
"""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Optional

import torch

from ._validation import check_options
from .nll import linear_weighted_nll, weighted_nll

IGNORE_INDEX = -100
_STATE = "_varkernels_patch"  # instance attribute of a patched model: the options and what it replaced


def patch_causal_lm(
    model: torch.nn.Module, *, strict: bool = False, chunk_size: Optional[int] = None, backend: str = "auto"
) -> torch.nn.Module:
    """Make ``model(..., labels=...)`` compute its loss inside the output embedding (module docstring).

    Args:
        model: a ``*ForCausalLM`` (Llama, Qwen2, Mistral, Gemma-2, ...), possibly wrapped (PEFT,
            ``torch.compile``, DDP, a DeepSpeed engine) or sharded (FSDP2); the causal LM inside is patched.
        strict: raise a ValueError now if the fused path does not apply to this head (else: fall back,
            with a warning, at the first call that needs it).
        chunk_size, backend: as in ``linear_weighted_nll``.
    Returns:
        ``model`` itself. Patching again only updates the options.
    """
    from .training.lm_head import LMHead, unwrap_model

    check_options(chunk_size=chunk_size, backend=backend)
    lm = unwrap_model(model)
    head = LMHead(lm)
    if strict and not head.in_head:
        raise ValueError(_not_in_head(lm, head))
    options = {"chunk_size": chunk_size, "backend": backend, "strict": strict}
    state = lm.__dict__.get(_STATE)
    if state is not None:
        state["options"] = options
        return model
    lm.__dict__[_STATE] = {"saved": lm.__dict__.get("forward"), "options": options, "warned": False}
    lm.forward = types.MethodType(_patched_forward_for(type(lm)), lm)
    return model


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_causal_lm` (the forward it replaced comes back); a no-op on an unpatched model."""
    from .training.lm_head import unwrap_model

    lm = unwrap_model(model)
    state = lm.__dict__.pop(_STATE, None)
    if state is not None:
        if state["saved"] is not None:
            lm.forward = state["saved"]
        else:
            lm.__dict__.pop("forward", None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    from .training.lm_head import unwrap_model

    return _STATE in unwrap_model(model).__dict__


# ----------------------------------------------------------------------------- the patched forward

_FORWARDS: dict = {}


def _patched_forward_for(cls):
    """The patched forward of one model class: the class forward's signature plus ``loss_weights``
    (``Trainer`` keeps the dataset columns the forward names), one function per class."""
    fn = _FORWARDS.get(cls)
    if fn is not None:
        return fn

    def forward(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    sig = inspect.signature(cls.forward)
    params = list(sig.parameters.values())
    if "loss_weights" not in sig.parameters:
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter("loss_weights", inspect.Parameter.KEYWORD_ONLY, default=None))
    forward.__signature__ = sig.replace(parameters=params)
    forward.__doc__ = cls.forward.__doc__
    forward.__name__ = forward.__qualname__ = "forward"
    _FORWARDS[cls] = fn = forward
    return fn


def _original(lm):
    state = lm.__dict__[_STATE]
    return state["saved"] if state["saved"] is not None else types.MethodType(type(lm).forward, lm)


def _forward(lm, *args, **kwargs):
    from .training.lm_head import LMHead

    original = _original(lm)
    kwargs = _as_keywords(lm, args, kwargs)
    loss_weights = kwargs.pop("loss_weights", None)
    if kwargs.get("labels") is None:
        if loss_weights is not None:
            raise ValueError("loss_weights needs labels")
        return original(**kwargs)
    state = lm.__dict__[_STATE]
    head = LMHead(lm)
    if not head.in_head:
        return _fallback(lm, head, state, original, kwargs, loss_weights)

    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    pre_shifted = kwargs.pop("shift_labels", None)  # HF's loss kwarg: labels already shifted (sequence parallel)
    opts = dict(chunk_size=state["options"]["chunk_size"], backend=state["options"]["backend"],
                softcap=head.softcap, ignore_index=IGNORE_INDEX)

    def loss_in_head(hidden, weight, bias):
        y = labels.to(hidden.device)
        if hidden.shape[:2] != y.shape:
            raise RuntimeError(f"lm_head received hidden states of shape {tuple(hidden.shape)}, expected "
                               f"[{y.shape[0]}, {y.shape[1]}, H] (labels of shape {tuple(y.shape)})")
        if loss_weights is not None:
            w = loss_weights.to(hidden.device)
            loss = linear_weighted_nll(hidden, weight, y, w, bias=bias, reduction="mean", shift_labels=True, **opts)
            return (loss * _token_share(y, num_items),)
        shift = pre_shifted is None
        if not shift:
            y = pre_shifted.to(hidden.device)
        w = _token_mean_weights(y, shift, num_items)
        return (linear_weighted_nll(hidden, weight, y, w, bias=bias, reduction="sum", shift_labels=shift, **opts),)

    call = _Call(original)
    result = head.run_in_head(call, kwargs, loss_in_head)  # (loss,): no NLLOutput, whose entropy is not needed here
    return _with_loss(result[0], call.outputs)


def _token_share(labels, num_items):
    """1 without ``num_items_in_batch``; with it (``Trainer``, which then neither divides by the accumulation
    steps nor averages over ranks), this micro-batch's share n / num_items_in_batch of the accumulated batch's
    target tokens: the micro-batches' weighted means then add up to their token-weighted average."""
    if num_items is None:
        return 1.0
    n = (labels[:, 1:] != IGNORE_INDEX).sum().to(torch.float32)
    return n / torch.as_tensor(num_items, dtype=torch.float32, device=labels.device)


def _token_mean_weights(labels, shift: bool, num_items):
    """Per-sequence weights N / n: with reduction="sum" the weighted NLL is then Σ_tokens −lp / n, Hugging
    Face's token mean (n = the batch's target tokens, at least 1: a batch without any gives 0, not NaN) or,
    with ``num_items_in_batch``, its token sum / num_items_in_batch."""
    N = labels.shape[0]
    if num_items is None:
        targets = labels[:, 1:] if shift else labels
        n = (targets != IGNORE_INDEX).sum().clamp(min=1).to(torch.float32)
    elif isinstance(num_items, torch.Tensor):
        n = num_items.to(device=labels.device, dtype=torch.float32)
    else:
        n = torch.tensor(float(num_items), device=labels.device)
    return (float(N) / n).expand(N)


class _Call:
    """What ``run_in_head`` calls as "the model": the original forward (the patched one is the module's
    ``forward``, so calling the module would recurse). Keeps the model's whole output for the caller."""

    def __init__(self, original):
        self.original, self.outputs = original, None

    def __call__(self, **inputs):
        self.outputs = self.original(**inputs)
        return self.outputs


def _with_loss(loss, outputs, keep_logits=False):
    """The model's output with ``loss`` set, and without logits unless ``keep_logits`` (on the fused path
    its logits are the head's [N, 1, 1] stand-in)."""
    if isinstance(outputs, tuple):
        return (loss, *(outputs if keep_logits else outputs[1:]))
    drop = ("loss",) if keep_logits else ("loss", "logits")
    return type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k not in drop})


def _as_keywords(lm, args, kwargs):
    """Positional arguments of the forward as keywords (``run_in_head`` takes a dict of inputs)."""
    if not args:
        return dict(kwargs)
    params = [p.name for p in inspect.signature(type(lm).forward).parameters.values()
              if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)][1:]
    if len(args) > len(params):
        raise TypeError(f"{type(lm).__name__}.forward takes {len(params)} positional arguments, got {len(args)}")
    named = dict(zip(params, args))
    clash = set(named) & set(kwargs)
    if clash:
        raise TypeError(f"{type(lm).__name__}.forward got multiple values for {sorted(clash)}")
    return {**named, **kwargs}


def _fallback(lm, head, state, original, kwargs, loss_weights):
    if state["options"]["strict"]:
        raise ValueError(_not_in_head(lm, head))
    if not state["warned"]:
        state["warned"] = True
        warnings.warn(f"patch_causal_lm: {_not_in_head(lm, head)}; this model computes its logits and its own loss",
                      stacklevel=3)
    if loss_weights is None:
        return original(**kwargs)
    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    outputs = original(**kwargs)
    logits = outputs[0] if isinstance(outputs, tuple) else outputs.logits
    y = labels.to(logits.device)
    loss = weighted_nll(logits, y, loss_weights.to(logits.device), reduction="mean", shift_labels=True,
                        ignore_index=IGNORE_INDEX, backend=state["options"]["backend"]) * _token_share(y, num_items)
    return _with_loss(loss, outputs, keep_logits=True)


def _not_in_head(lm, head) -> str:
    return (f"the output embedding of {type(lm).__name__} ({type(head.module).__name__}) is not a plain nn.Linear "
            "without logit scaling, so the fused-linear loss does not apply to it")
