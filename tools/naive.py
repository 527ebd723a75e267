"""The VAR loss as a user would write it in plain PyTorch (the baseline of every benchmark):
log_softmax over the whole [B, T, V] tensor, gather, masked sum, weights from the B×B matrices."""

from __future__ import annotations

import math

import torch


def naive_var_loss(logits, labels, rewards, ref_logps, beta=1.0, ignore_index=-100):
    mask = labels != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    s = lp.sum(-1) / mask.sum(-1).clamp(min=1)
    with torch.no_grad():
        A = rewards / beta + ref_logps
        log_z = torch.logsumexp(A, dim=-1) - math.log(A.shape[0])
        w = torch.exp(A.diagonal() - log_z)
    return -(w * s).mean()


def naive_linear_var_loss(hidden, weight, labels, rewards, ref_logps, beta=1.0, ignore_index=-100):
    return naive_var_loss(hidden @ weight.t(), labels, rewards, ref_logps, beta, ignore_index)
