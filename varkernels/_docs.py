"""One source for the docstring fragments the public functions share (a leaf module).

A public function's docstring holds a line ``{name}`` (alone, indented like an argument) for each
fragment it shares; :func:`compose` replaces it by the fragment, with the line's indentation and
continuation lines indented four more. So the description of ``labels``, ``shift_labels``, the
logit transforms, ``backend`` … is written once and reads the same in every function.
"""

from __future__ import annotations

import re

FRAGMENTS = {
    "logits": "logits: [B, T, V] float32/bfloat16/float16, any strides (never copied, also with shift_labels).",
    "hidden": "hidden: [B, T, H] float32/bfloat16/float16, any strides (never copied, also with shift_labels).",
    "weight": "weight: [V, H] as ``lm_head.weight``, dtype of hidden. bias: [V] or None (keyword-only).",
    "labels": "labels: [B, T] int64/int32; ``ignore_index`` marks prompt and padding.",
    "weights": (
        "weights: [B] (per sequence) or [B, T] (per token, indexed like labels and shifted with them),\n"
        "float constants of any sign."
    ),
    "shift_labels": "shift_labels: Hugging Face causal shift (position t predicts labels[:, t+1]); no copy of logits.",
    "transforms": "softcap, temperature: logit transforms c·tanh(ℓ/c), then ℓ/τ.",
    "inplace": (
        "inplace: overwrite ``logits`` with its gradient (saves a [B, T, V] buffer; destroys logits).\n"
        "Nothing is written under ``torch.no_grad()``."
    ),
    "backend": 'backend: "auto" | "triton" | "cpu" | "torch".',
    "chunk_size": (
        "chunk_size: token rows per chunk; default ``default_chunk_size(V, device, dtype)`` (a block of\n"
        "logits in their dtype: 32 MiB on CPU, 256 MiB on CUDA)."
    ),
    "grad_accum_dtype": (
        "grad_accum_dtype: dtype of the weight/bias gradient accumulators: torch.float32 (default:\n"
        "rounded once, at the end) or the weight's dtype (V·H·2 bytes less for bf16/fp16 weights,\n"
        "one rounding per chunk; README gives the measured error)."
    ),
    "return_entropy": (
        "return_entropy: also return the policy's entropy, fp32 [B]: per sequence, the mean over its\n"
        "non-ignored tokens of −Σ_v p_v·log p_v, p the softmax of the transformed logits (softcap,\n"
        "temperature: the distribution of the log-probs); 0 for a row without tokens; no gradient.\n"
        "With reduction=\"none\" it is per token instead, fp32 [B, T] like the log-probs (0 where ignored).\n"
        "Computed in the logsumexp sweep the log-probs already make (no extra pass over the vocabulary)."
    ),
    "one_backward": "Computed in the forward, the gradient allows one backward per graph (call again for another).",
}

_PLACEHOLDER = re.compile(r"^( *)\{(\w+)\}$", re.M)


def compose(fn):
    """Decorator: fill the ``{name}`` lines of ``fn.__doc__`` from :data:`FRAGMENTS`."""

    def fill(m: re.Match) -> str:
        indent, name = m.group(1), m.group(2)
        first, *rest = FRAGMENTS[name].split("\n")
        return "\n".join([indent + first, *(indent + "    " + line for line in rest)])

    if fn.__doc__:
        fn.__doc__ = _PLACEHOLDER.sub(fill, fn.__doc__)
    return fn
