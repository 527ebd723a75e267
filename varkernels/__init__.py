"""varkernels: fused kernels for the VAR (Variational Alignment with Re-weighting) loss.

Public API (docs/design.md §2):
    fused_var_loss(logits [B,T,V], labels [B,T], rewards, ref_logps, ...)         -> loss | VAROutput
    fused_linear_var_loss(hidden [B,T,H], weight [V,H], labels, rewards, ref_logps, ...)
    sequence_logps(logits, labels, reduction=...)          differentiable, [B] or [B,T] fp32
    linear_sequence_logps(hidden, weight, labels, ...)     differentiable, [B] or [B,T] fp32
    weighted_nll(logits, labels, weights [B] | [B,T], ...)                      -> loss | NLLOutput
    linear_weighted_nll(hidden, weight, labels, weights, ...)                 the VAR-agnostic core, public
    var_weights(rewards, ref_logps, *, beta, weighting)    the weights of fused_var_loss, for any weighted loss
    patch_causal_lm(model), unpatch_causal_lm(model)       a HF causal LM computes its labels= loss in lm_head
    var_loss_reference(...)                                plain PyTorch, the spec in code
    release_grad_buffers(), set_grad_buffer_cache(...), grad_buffer_stats()
                                                           the CPU gradient-buffer cache (README: Use)
"""

from ._validation import VAROutput
from .core._grad_buffers import grad_buffer_stats, release_grad_buffers, set_grad_buffer_cache
from .logps import linear_sequence_logps, sequence_logps
from .nll import NLLOutput, linear_weighted_nll, weighted_nll
from .reference import linear_var_loss_reference, var_loss_reference
from .var import VARLoss, fused_linear_var_loss, fused_var_loss
from .weights import var_weights

__version__ = "0.1.0"

# Training-side names are imported lazily so that `import varkernels` does not import transformers.
_LAZY = {
    "VARTrainer": "training.trainer",
    "VARConfig": "training.trainer",
    "compute_var_loss": "training.trainer",
    "OnlineVARTrainer": "training.online",
    "OnlineVARConfig": "training.online",
    "VARDataset": "training.data",
    "VARCollator": "training.data",
    "cross_pair_logps": "training.pairs",
    "cross_pair_rewards": "training.pairs",
    "patch_causal_lm": "patch",
    "unpatch_causal_lm": "patch",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'varkernels' has no attribute {name!r}")

__all__ = [
    "VAROutput",
    "NLLOutput",
    "VARLoss",
    "weighted_nll",
    "linear_weighted_nll",
    "fused_var_loss",
    "fused_linear_var_loss",
    "sequence_logps",
    "linear_sequence_logps",
    "var_loss_reference",
    "linear_var_loss_reference",
    "var_weights",
    "release_grad_buffers",
    "set_grad_buffer_cache",
    "grad_buffer_stats",
    "__version__",
    *_LAZY,
]
