"""VAR training with ``transformers``: ``VARConfig``, ``VARTrainer`` and ``compute_var_loss``.

docs/design.md §5. One training batch is k whole VAR groups (``per_device_train_batch_size = k`` items of a
:class:`varkernels.training.data.VARDataset`), stacked by :class:`varkernels.training.data.VARCollator`:

    input_ids, attention_mask, labels: [k·B, T]      rewards, ref_logps: [k, B, B] or [k, B]

:func:`compute_var_loss` runs the model once, with the loss computed inside the output
embedding's forward (:meth:`varkernels.training.lm_head.LMHead.run_in_head`): there it gets the
final hidden states and the whole ``lm_head`` weight, also under FSDP2 / DeepSpeed ZeRO-3 (which
gather it only around that forward and its backward) and in the autocast dtype that accelerate
applies to the forward, and calls :func:`varkernels.fused_linear_var_loss` once on all k groups
(rewards [k, B, B]: one fp32 weight-gradient accumulator, not k); the
[k·B, T, V] logits are never formed. The batch loss is the mean of the k group losses.

Exactness. Each group's weights are normalised inside the group, and a batch's loss is the mean
over its groups, so for groups of one size B the update does not depend on how groups are spread
over micro-batches, accumulation steps or ranks: k groups in one batch, k accumulation steps of
one group (``Trainer`` divides each by the number of steps) and k DDP ranks of one group each (DDP
averages gradients) all give the gradient of (1/k)·Σ_g loss_g. A group is never split: splitting
one changes its in-batch partition function Ẑ.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._extras import missing_extra

try:
    from transformers import Trainer, TrainingArguments
except ImportError as e:  # the scoring and data modules of varkernels.training work without it
    raise missing_extra("transformers", "train", "varkernels.training.trainer") from e

from .._validation import LOGP_REDUCTIONS, WEIGHTINGS, VAROutput  # noqa: E402
from .data import VARCollator, VARDataset
from .lm_head import LMHead

_LOSS_BACKENDS = ("auto", "triton", "cpu", "torch")


def split_groups(batch: dict) -> tuple[int, int, bool]:
    """(k groups, B per group, cross_pairs) of a collated batch; raises ValueError on bad shapes.

    rewards/ref_logps: [k, B, B] (cross-pair) or [k, B] (shared context); a single group may
    also come as [B, B] or [B].
    """
    for name in ("input_ids", "labels", "rewards", "ref_logps"):
        if name not in batch:
            raise ValueError(
                f"batch is missing {name!r}: expected input_ids/attention_mask/labels [k*B, T] and "
                "rewards/ref_logps [k, B, B] or [k, B] (see varkernels.training.data.VARCollator)"
            )
    N = batch["input_ids"].shape[0]
    R, Q = batch["rewards"], batch["ref_logps"]
    if R.shape != Q.shape:
        raise ValueError(f"rewards and ref_logps must have the same shape, got {tuple(R.shape)} and {tuple(Q.shape)}")
    if R.dim() == 3 and R.shape[1] == R.shape[2] and R.shape[0] * R.shape[1] == N:
        return R.shape[0], R.shape[1], True
    if R.dim() == 2 and R.shape[0] == R.shape[1] == N:
        return 1, N, True
    if R.dim() == 2 and R.shape[0] * R.shape[1] == N:
        return R.shape[0], R.shape[1], False
    if R.dim() == 1 and R.shape[0] == N:
        return 1, N, False
    raise ValueError(
        f"rewards must have shape [k, B, B] or [k, B] with k*B = input_ids.shape[0] = {N}, got {tuple(R.shape)}"
    )


def compute_var_loss(
    model: torch.nn.Module,
    batch: dict,
    *,
    beta: float = 1.0,
    weighting: str = "posterior",
    logp_reduction: str = "mean",
    use_fused_linear: bool = True,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    ignore_index: int = -100,
) -> VAROutput:
    """VAR loss of a batch of k whole groups; the building block of ``VARTrainer.compute_loss``.

    Args:
        model: a causal LM (``*ForCausalLM``), possibly wrapped (DDP, a DeepSpeed engine, PEFT,
            ``torch.compile``) or sharded (FSDP2 ``fully_shard``): it is called through the
            wrapper, so the engine's hooks fire.
        batch: ``input_ids`` / ``attention_mask`` / ``labels`` [k·B, T] (labels = the response
            tokens, ``ignore_index`` elsewhere, unshifted) and ``rewards`` / ``ref_logps``
            [k, B, B] or [k, B].
        use_fused_linear: hidden states + ``fused_linear_var_loss`` (no [k·B, T, V] logits).
            False, or a model whose head is not a plain ``nn.Linear`` (LoRA on ``lm_head``,
            a logit scale), computes the model's logits and uses ``fused_var_loss``.
    Returns:
        ``VAROutput``: ``loss`` = mean over the k groups of the group losses (float32 scalar);
        ``weights`` / ``log_z`` / ``policy_logps`` [k·B]; ``ess`` = mean of the k groups' ESS.
    """
    import varkernels

    k, B, cross = split_groups(batch)
    R = batch["rewards"].reshape((k, B, B) if cross else (k, B))
    Q = batch["ref_logps"].reshape(R.shape)
    labels = batch["labels"]
    head = LMHead(model)
    fused = use_fused_linear and head.in_head
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    opts = dict(
        beta=beta, weighting=weighting, logp_reduction=logp_reduction, ignore_index=ignore_index,
        shift_labels=True, softcap=head.softcap, return_aux=True, backend=backend,
    )

    if fused:
        # Inside lm_head's forward: there FSDP2 / ZeRO-3 have gathered the whole weight, and
        # autocast (which accelerate wraps around the model's forward) is on.
        def loss_in_head(hidden, weight, bias):
            if hidden.shape[:2] != labels.shape:
                raise RuntimeError(
                    f"lm_head received hidden states of shape {tuple(hidden.shape)}, expected "
                    f"[{labels.shape[0]}, {labels.shape[1]}, H] (every position of input_ids)"
                )
            weight, bias, hidden = _head_operands(weight, bias, hidden)
            # all k groups in one call: each normalised inside itself, one fp32 weight-gradient accumulator
            return varkernels.fused_linear_var_loss(hidden, weight, labels, R, Q, bias=bias, chunk_size=chunk_size,
                                                    **opts)

        return head.run_in_head(model, inputs, loss_in_head)

    logits = model(**inputs).logits
    return varkernels.fused_var_loss(logits, labels, R, Q, **opts)


def _head_operands(weight, bias, hidden):
    """lm_head operands for the fused-linear loss, in one dtype.

    Under autocast (``Trainer`` with ``bf16=True`` / ``fp16=True``) ``lm_head`` would run in the
    autocast dtype, so hidden, weight and bias are cast to it (the cast is differentiable: the
    fp32 master weight gets its gradient). Otherwise hidden is cast to the weight's dtype.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return weight.to(dt), bias.to(dt) if bias is not None else None, hidden.to(dt)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return weight, bias, hidden


@dataclass
class VARConfig(TrainingArguments):
    """``TrainingArguments`` plus the VAR loss options.

    ``per_device_train_batch_size`` counts whole groups of B examples (B is fixed by the
    dataset). ``remove_unused_columns`` defaults to False: ``rewards`` / ``ref_logps`` are not
    arguments of the model's forward but the loss needs them.
    """

    beta: float = field(default=1.0, metadata={"help": "VAR temperature β > 0 of the optimal policy."})
    weighting: str = field(default="posterior", metadata={"help": "'posterior' (bounded, default) or 'importance'."})
    logp_reduction: str = field(
        default="mean", metadata={"help": "'mean' or 'sum' over response tokens; must match the ref_logps."}
    )
    use_fused_linear: bool = field(
        default=True, metadata={"help": "Hidden states + fused_linear_var_loss (no logits); False: logits path."}
    )
    loss_chunk_size: Optional[int] = field(
        default=None, metadata={"help": "Token rows per chunk of the fused-linear loss (None: from a memory budget)."}
    )
    loss_backend: str = field(default="auto", metadata={"help": "'auto' | 'triton' | 'cpu' | 'torch'."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: rewards/ref_logps must reach the loss."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta > 0:
            raise ValueError(f"beta must be a number > 0, got {self.beta!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if self.logp_reduction not in [r for r in LOGP_REDUCTIONS if r != "none"]:
            raise ValueError(f"logp_reduction must be one of ['mean', 'sum'], got {self.logp_reduction!r}")
        if self.loss_backend not in _LOSS_BACKENDS:
            raise ValueError(f"loss_backend must be one of {list(_LOSS_BACKENDS)}, got {self.loss_backend!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False for VAR: it would drop rewards and ref_logps")


_METRICS = ("weights_mean", "weights_min", "weights_max", "ess", "log_z", "policy_logps", "ref_logps", "rewards")


class VARTrainer(Trainer):
    """``transformers.Trainer`` training a causal LM with the VAR loss on a ``VARDataset``.

    The loss (:func:`compute_var_loss`) is exact under gradient accumulation and DDP for groups
    of one size B (see the module docstring). Logged with the usual ``loss`` (averaged over the
    logging interval, on this rank): ``var/weights_mean|min|max``, ``var/ess``, ``var/log_z``
    (mean log Ẑ_i), ``var/policy_logps`` (mean s_i), ``var/ref_logps`` and ``var/rewards`` (means
    of the diagonals Q[i, i], R[i, i]); with an ``eval_`` prefix in evaluation.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by GA steps

    def __init__(self, model=None, args: Optional[VARConfig] = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, **kwargs):
        if args is None:
            args = VARConfig(output_dir="var_output")
        if not isinstance(args, VARConfig):
            raise TypeError(f"args must be a varkernels.training.VARConfig, got {type(args).__name__}")
        for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            reduction = getattr(ds, "reduction", None)
            if reduction is not None and reduction != args.logp_reduction:
                raise ValueError(
                    f"{name} was scored with reduction={reduction!r} but args.logp_reduction="
                    f"{args.logp_reduction!r}: the reference and policy log-probs must be reduced alike"
                )
        if data_collator is None:
            ds = train_dataset if train_dataset is not None else eval_dataset
            data_collator = VARCollator(
                pad_token_id=getattr(ds, "pad_token_id", 0), ignore_index=getattr(ds, "ignore_index", -100)
            )
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, **kwargs)
        self._var_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        out = compute_var_loss(
            model, inputs, beta=args.beta, weighting=args.weighting, logp_reduction=args.logp_reduction,
            use_fused_linear=args.use_fused_linear, chunk_size=args.loss_chunk_size, backend=args.loss_backend,
        )
        self._record("train" if model.training else "eval", out, inputs)
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _record(self, mode: str, out: VAROutput, inputs: dict) -> None:
        w = out.weights.detach()
        R, Q = inputs["rewards"], inputs["ref_logps"]
        diag_r = R.diagonal(dim1=-2, dim2=-1) if R.dim() == 3 else R
        diag_q = Q.diagonal(dim1=-2, dim2=-1) if Q.dim() == 3 else Q
        vals = torch.stack([
            w.mean(), w.min(), w.max(), out.ess.detach(), out.log_z.detach().mean(),
            out.policy_logps.detach().mean(), diag_q.float().mean(), diag_r.float().mean(),
        ]).float()
        self._var_metrics[mode]["step"].append(vals)  # no host sync here; one .tolist() at log time

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        # Attach to the periodic train / eval logs only, not to the end-of-training summary.
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        steps = self._var_metrics[mode].pop("step", []) if mode is not None else []
        if steps:
            table = torch.stack(steps).cpu()
            agg = table.mean(dim=0).tolist()
            agg[1], agg[2] = table[:, 1].min().item(), table[:, 2].max().item()
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}var/{name}": round(v, 6) for name, v in zip(_METRICS, agg)})
        super().log(logs, start_time)


__all__ = ["VARConfig", "VARTrainer", "compute_var_loss", "split_groups", "VARDataset", "VARCollator"]
