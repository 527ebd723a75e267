"""One place prepares a call of every public op: validation, backend, label shift, groups, options.

:func:`prepare_call` runs every check of docs/design.md §2 before any kernel touches memory — the
static checks of x ([B, T, *], logits or hidden) against labels, of the lm_head operands, of the
logit transforms, of rewards / ref_logps or weights when given, and of devices; then resolves the
backend (loading the C++ kernel when it is chosen) and runs the data-dependent checks (one host
sync, eager mode only). It returns a :class:`Prepared` call: the labels flattened (and shifted,
Hugging Face causal convention, when ``shift_labels``; x is never copied), the group layout of
rewards, and the :class:`~varkernels.core.token.TokenOptions` record that flows down the op stack.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._backend import resolve_backend
from ._validation import (
    check_linear,
    check_options,
    check_pair_inputs,
    check_policy_inputs,
    check_same_device,
    check_values,
    check_weights,
    shifted_labels,
)
from .core.autograd import head_dtype
from .core.linear import default_chunk_size
from .core.token import TokenOptions


class Prepared(NamedTuple):
    """What :func:`prepare_call` hands to the compute path."""

    opts: TokenOptions  # the resolved backend and the options of the token op
    labels: torch.Tensor  # [B, T], shifted when shift_labels
    groups: int  # k (1 without rewards)
    group_size: int  # B rows per group
    cross_pairs: bool

    @property
    def backend(self) -> str:
        return self.opts.backend

    @property
    def flat_labels(self) -> torch.Tensor:
        """[B·T] contiguous, as the token op takes them."""
        return self.labels.reshape(-1).contiguous()


def prepare_call(
    name: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    head: Optional[tuple] = None,
    ignore_index: int,
    shift_labels: bool,
    softcap,
    temperature,
    backend: str,
    chunk_size: Optional[int] = None,
    grad_accum_dtype: torch.dtype = torch.float32,
    rewards: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    inplace: bool = False,
    return_aux: bool = False,
    return_entropy: bool = False,
) -> Prepared:
    """Every check of a public op, then the prepared call (see the module docstring).

    Args:
        name: "logits" or "hidden", for the messages. x: [B, T, V] logits or [B, T, H] hidden states.
        head: (weight [V, H], bias [V] | None) of the fused-linear form; None for the logits form.
        rewards, ref_logps: the VAR inputs (shapes of ``check_pair_inputs``); weights: of the weighted NLL.
        inplace, return_aux, return_entropy: the op's flags, checked here with the other options (the op reads
            them itself).
        The option strings of the losses (reduction, weighting, ...) and beta are checked by the caller first.
    """
    # every option of the call, once (types and ranges, _validation.check_options), normalised: the
    # operators' schemas take Python ints and floats, not numpy scalars
    o = check_options(temperature=temperature, softcap=softcap, ignore_index=ignore_index, chunk_size=chunk_size,
                      shift_labels=shift_labels, inplace=inplace, return_aux=return_aux,
                      return_entropy=return_entropy)
    softcap, ignore_index, chunk_size = o["softcap"], o["ignore_index"], o["chunk_size"]
    shift_labels = o["shift_labels"]
    if head is not None:
        weight, bias = head
        check_linear(x, weight, bias, grad_accum_dtype)
        vocab_size = weight.shape[0]
    else:
        vocab_size = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() == 3 else 0
    check_policy_inputs(name, x, labels, vocab_size)
    k, group, cross = 1, x.shape[0], False
    if rewards is not None or ref_logps is not None:
        k, group, cross = check_pair_inputs(rewards, ref_logps, x.shape[0])
    if weights is not None:
        check_weights(weights, tuple(labels.shape))
    check_same_device(**{name: x, "labels": labels, "rewards": rewards, "ref_logps": ref_logps, "weights": weights})
    resolved = resolve_backend(backend, x.device)
    check_values(labels, vocab_size, ignore_index, rewards, ref_logps, weights)
    labels_eff = shifted_labels(labels, ignore_index) if shift_labels else labels
    if head is not None:
        gemm_itemsize = head_dtype(x, head[0]).itemsize  # the logits chunks' dtype (autocast's under autocast)
        chunk_size = chunk_size or default_chunk_size(vocab_size, x.device.type, gemm_itemsize)
    opts = TokenOptions(backend=resolved, softcap=softcap, inv_temperature=1.0 / float(temperature),
                        ignore_index=ignore_index, chunk_size=chunk_size or 0,
                        accum_fp32=grad_accum_dtype == torch.float32)
    return Prepared(opts, labels_eff, k, group, cross)
