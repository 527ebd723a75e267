"""The causal LM's output head, as the fused-linear ops need it: ``unwrap_model`` and ``LMHead``, whose
``run_in_head`` runs a loss inside the head's forward (training) and ``forward`` captures the decoder's
hidden states (no-grad scoring). docs/trainer.md, "VARConfig and VARTrainer" and "Cross-pair scoring".
"""

from __future__ import annotations

import inspect
import weakref
from typing import Optional

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP / DeepSpeed / FSDP / ``torch.compile`` (accelerate's ``extract_model_from_parallel``)
    and PEFT (``get_base_model``) wrappers: for reading its head, config and signature; it is still *called*
    through its wrappers (so their hooks fire)."""
    from accelerate.utils import extract_model_from_parallel  # lazily: the scoring modules need no train extra

    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if callable(getattr(model, "get_base_model", None)):  # peft.PeftModel
        model = extract_model_from_parallel(model.get_base_model(), keep_torch_compile=False)
    return model


class LMHead:
    """How to turn a causal LM's last hidden states into log-probs without [.., T, V] logits.

    ``in_head``: a plain ``nn.Linear`` output embedding (FSDP2's ``FSDPLinear`` too; not LoRA) and no logit
    transform but a softcap: :meth:`run_in_head` applies. ``fused`` (:meth:`forward`, scoring) also needs a
    ``logits_to_keep`` argument and a findable decoder. Otherwise the model's logits are used.
    """

    def __init__(self, model: torch.nn.Module):
        lm = unwrap_model(model)
        config = getattr(lm, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.module = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        params = inspect.signature(lm.forward).parameters
        self.keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in params), None)
        # transformers ≥ 5.24 renamed the forward's past_key_values to cache (the old name warns)
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.decoder = _decoder(lm)
        unsupported_scale = any(getattr(config, a, None) not in (None, 1.0) for a in ("logit_scale", "logits_scaling"))
        self.in_head = _is_plain_linear(self.module) and not unsupported_scale
        self.fused = self.in_head and self.keep_arg is not None and self.decoder is not None
        self.vocab_size = _vocab_size(lm)

    def run_in_head(self, model, inputs: dict, loss_fn, with_outputs: bool = False):
        """Run ``model(**inputs)`` (through its wrappers) once with ``loss_fn(hidden, weight, bias)`` in place of
        the head: hidden [N, L, H] (``logits_to_keep=0``), the head's parameters whole (FSDP2, ZeRO-3) and in their
        own dtypes. ``loss_fn`` returns a ``VAROutput`` or a NamedTuple whose first field is the scalar loss; it is
        returned with the loss tied to the model's output, so that the loss's backward runs after the engines'
        hooks (docs/trainer.md, "VARConfig and VARTrainer"). ``with_outputs``: (it, the model's outputs).
        """
        if not self.in_head:
            raise RuntimeError("run_in_head needs a plain nn.Linear output embedding (LMHead.in_head)")
        swap = _swap_for(self.module)
        if self.keep_arg is not None:
            inputs = {**inputs, self.keep_arg: 0}
        swap.begin(loss_fn)
        try:
            outputs = model(**inputs)
        finally:
            result, calls = swap.end()
        if calls != 1:
            raise RuntimeError(
                f"the output embedding {type(self.module).__name__} ran {calls} times in one forward of "
                f"{type(unwrap_model(model)).__name__}; the fused-linear loss needs exactly one call "
                "(use use_fused_linear=False for this model)"
            )
        logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, (tuple, list)) and outputs:
            logits = outputs[0]
        if not isinstance(logits, torch.Tensor):
            raise RuntimeError(f"{type(unwrap_model(model)).__name__} returned no logits tensor")
        loss = _Join.apply(result[0], logits)
        result = result._replace(loss=loss) if hasattr(result, "_replace") else (loss, *result[1:])
        return (result, outputs) if with_outputs else result

    def forward(self, model, **inputs):
        """(features, outputs) of ``model(**inputs)``, run through its wrappers (so DDP hooks fire): features are
        the [N, L, H] last hidden states when ``fused``, else the [N, L, V] logits."""
        if self.cache_arg != "past_key_values" and "past_key_values" in inputs:
            inputs[self.cache_arg] = inputs.pop("past_key_values")
        if not self.fused:
            out = model(**inputs)
            return out.logits, out
        captured = []

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = self.decoder.register_forward_hook(hook)
        try:
            out = model(**inputs, **{self.keep_arg: 1})
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"expected one call of the decoder {type(self.decoder).__name__}, got {len(captured)}")
        return captured[0], out

    def logps(self, features, labels, *, reduction, shift_labels=False, chunk_size=None, backend="auto"):
        import varkernels

        opts = dict(reduction=reduction, shift_labels=shift_labels, softcap=self.softcap, backend=backend)
        if self.fused:  # the weight as seen outside the head's forward: the no-grad scoring path, plain models only
            return varkernels.linear_sequence_logps(features, self.module.weight, labels, bias=self.module.bias,
                                                    chunk_size=chunk_size, **opts)
        return varkernels.sequence_logps(features, labels, **opts)


def output_cache(outputs):
    """The KV cache of a model output (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = outputs.get(name) if isinstance(outputs, dict) else getattr(outputs, name, None)
        if value is not None:
            return value
    return None


def _is_plain_linear(head) -> bool:
    """An ``nn.Linear`` as built (LoRA / quantised layers are other classes), or FSDP2's
    ``FSDPLinear`` (``fully_shard`` swaps the class for one deriving from FSDPModule and it)."""
    cls = type(head)
    return cls is torch.nn.Linear or (cls.__name__ == "FSDPLinear" and cls.__bases__[-1:] == (torch.nn.Linear,))


class _Join(torch.autograd.Function):
    """``loss`` unchanged, with the model's output as a second input (zero gradient): the stand-in logits come from
    the loss, so the loss's backward runs after the hooks engines put on module outputs (FSDP2's, ZeRO-3's)."""

    @staticmethod
    def forward(ctx, loss, logits):
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)


class _StandIn(torch.autograd.Function):
    """[N, 1, 1] zeros returned by the swapped head; its backward leads into ``loss`` (grad 0)."""

    @staticmethod
    def forward(ctx, loss, n, dtype):
        return torch.zeros((n, 1, 1), dtype=dtype, device=loss.device)

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros((), dtype=torch.float32, device=grad.device), None, None


class _HeadSwap:
    """The replacement forward of one head module; one object per module, so a compiled model
    sees the same function on every step (no recompilation). ``torch._dynamo.disable``: the
    loss runs eagerly inside a compiled model (a graph break at the head)."""

    def __init__(self, module):
        self._module = weakref.ref(module)  # the registry below is keyed weakly by the module
        self.fn = self.result = self.saved = None
        self.calls = 0
        self.forward = torch._dynamo.disable(self._forward, recursive=True)

    @property
    def module(self):
        return self._module()

    def begin(self, fn):
        if self.fn is not None:
            raise RuntimeError("run_in_head is already running on this head (re-entrant call)")
        self.fn, self.calls, self.result = fn, 0, None
        self.saved = self.module.__dict__.get("forward")  # an instance forward set by someone else
        self.module.forward = self.forward

    def end(self):
        if self.saved is not None:
            self.module.forward = self.saved
        else:
            self.module.__dict__.pop("forward", None)
        result, calls = self.result, self.calls
        self.fn = self.result = self.saved = None
        return result, calls

    def _forward(self, hidden, *args, **kwargs):
        self.calls += 1
        if self.calls > 1:
            return torch.zeros((hidden.shape[0], 1, 1), dtype=hidden.dtype, device=hidden.device)
        self.result = self.fn(hidden, self.module.weight, self.module.bias)
        return _StandIn.apply(self.result[0], hidden.shape[0], hidden.dtype)


_SWAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _swap_for(module) -> _HeadSwap:
    swap = _SWAPS.get(module)
    if swap is None:
        swap = _SWAPS[module] = _HeadSwap(module)
    return swap


def _decoder(lm) -> Optional[torch.nn.Module]:
    try:
        dec = lm.get_decoder()
    except (AttributeError, NotImplementedError):
        dec = None
    if dec is None or dec is lm:
        dec = getattr(lm, getattr(lm, "base_model_prefix", "") or "model", None)
    return dec if isinstance(dec, torch.nn.Module) and dec is not lm else None


def _vocab_size(lm) -> Optional[int]:
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return getattr(getattr(lm, "config", None), "vocab_size", None)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


