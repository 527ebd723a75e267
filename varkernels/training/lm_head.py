"""The causal LM's output head, as the fused-linear ops need it.

``unwrap_model`` finds the causal LM inside DDP / accelerate / PEFT wrappers; ``LMHead`` decides
whether the fused-linear path applies (a plain ``nn.Linear`` head, a ``logits_to_keep`` argument,
a findable decoder) and runs the model for its last hidden states instead of its logits.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside DDP / accelerate / PEFT wrappers (for reading ``lm_head`` and config)."""
    for _ in range(8):  # wrappers nest a few levels at most (accelerate → DDP → PEFT)
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DataParallel
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        else:
            break
    return model


class LMHead:
    """How to turn a causal LM's last hidden states into log-probs without [.., T, V] logits.

    ``fused`` is True for a standard causal LM: ``lm_head`` is a plain ``nn.Linear`` (not a LoRA
    layer), the forward accepts ``logits_to_keep``, the decoder (``get_decoder()`` or the
    ``base_model_prefix`` attribute) is found, and no logit transform other than a softcap is
    configured. Then the decoder's output (the final-norm hidden states the head reads) is
    captured by a forward hook while the whole model runs with ``logits_to_keep=1``, and
    ``weight``/``bias``/``softcap`` feed the fused-linear ops. Otherwise the model's logits are used.
    """

    def __init__(self, model: torch.nn.Module):
        lm = unwrap_model(model)
        config = getattr(lm, "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None) if config is not None else None
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        params = inspect.signature(lm.forward).parameters
        self.keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in params), None)
        self.decoder = _decoder(lm)
        unsupported_scale = config is not None and any(
            getattr(config, a, None) not in (None, 1.0) for a in ("logit_scale", "logits_scaling")
        )
        self.fused = (
            type(head) is torch.nn.Linear
            and self.keep_arg is not None
            and self.decoder is not None
            and not unsupported_scale
        )
        self.weight = head.weight if self.fused else None
        self.bias = head.bias if self.fused else None
        self.vocab_size = _vocab_size(lm)

    def forward(self, model, **inputs):
        """Run ``model`` (through any wrapper, so DDP hooks fire); return (features, outputs).

        features: [N, L, H] last hidden states when ``fused``, else [N, L, V] logits.
        """
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
        if self.fused:
            return varkernels.linear_sequence_logps(
                features, self.weight, labels, bias=self.bias, chunk_size=chunk_size, **opts
            )
        return varkernels.sequence_logps(features, labels, **opts)


def _decoder(lm) -> Optional[torch.nn.Module]:
    dec = None
    if hasattr(lm, "get_decoder"):
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


