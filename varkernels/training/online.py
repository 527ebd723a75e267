"""Online VAR on TRL's ``GRPOTrainer``: sample G completions per prompt, weight each prompt's group, train the
weighted NLL. What it computes, the checks and the TRL 1.16 methods it overrides: docs/online.md.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._validation import REDUCTIONS, check_option, check_positive
from ..logps import linear_sequence_logps, sequence_logps
from ..nll import linear_weighted_nll, weighted_nll
from ..var.weights import group_ess
from .lm_head import LMHead, unwrap_model
from .rewards import as_scores, call_reward_func
from .trainer import CompleteCheckpoints, quiet_on_cpu

try:  # the train extra: trl (and transformers)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import is_conversational
    from trl.trainer import grpo_trainer as _grpo
except ImportError as e:  # pragma: no cover - exercised only without the train extra
    raise ImportError('OnlineVARTrainer needs TRL: pip install "varkernels[train]"') from e

VAR_REFERENCES, VAR_BASELINES = ("policy", "initial"), ("none", "mean")


def online_var_weights(
    rewards: torch.Tensor,
    group_size: int,
    beta: float,
    q: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """VAR weights of consecutive groups of ``group_size`` completions: [M] → [M] fp32.

    w_j = n·softmax_j(r_j/β + q_j) over each group's n ``valid`` (scorable) members; the others get 0.
    rewards, q: [M] (M a multiple of group_size), q = 0 when None; valid: [M] bool or None. In float64, with r less
    its group's best (softmax is shift-invariant): (r − max r)/β ≤ 0 does not overflow at any β > 0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [M], M a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    r = rewards.detach().double().view(-1, group_size)
    valid = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.view(-1, group_size)
    a = (r - r.masked_fill(~valid, -math.inf).amax(dim=1, keepdim=True)) / float(beta)
    if q is not None:
        a = a + q.detach().double().view(-1, group_size)
    n = valid.sum(dim=1, keepdim=True)  # a group with none valid: softmax of −inf is NaN, replaced by 0
    return torch.where(n > 0, torch.softmax(a.masked_fill(~valid, -math.inf), dim=1) * n, 0.0).reshape(-1).float()


@dataclass
class OnlineVARConfig(GRPOConfig):
    """``GRPOConfig`` plus VAR's options; GRPO's surrogate-loss options are ignored or rejected (docs/online.md)."""

    var_beta: float = field(
        default=0.1, metadata={"help": "VAR's β > 0: the target is ∝ π_ref·exp(r/β) (smaller: sharper weights)."}
    )
    var_reference: str = field(
        default="initial",
        metadata={"help": "'initial' (default: q = log π_ref − log π_old, the fixed target π_ref·exp(r/β), a frozen "
                  "reference model) or 'policy' (q = 0, target π_old·exp(r/β), no reference model): docs/online.md."},
    )
    var_baseline: str = field(
        default="none", metadata={"help": "'none' (default) or 'mean': train on w − 1 over each prompt's scorable "
                                  "completions; needs fresh generations every optimizer step: docs/online.md."},
    )
    var_logp_reduction: str = field(
        default="mean", metadata={"help": "Per-completion reduction of the NLL: 'mean' over tokens or 'sum'."}
    )
    # GRPO's default, True, is set in __post_init__ as activation_checkpointing (transformers' non-deprecated name)
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={"help": "Deprecated alias (transformers)."})

    def __post_init__(self):
        check_positive("var_beta", self.var_beta)
        check_option("var_reference", self.var_reference, VAR_REFERENCES)
        check_option("var_baseline", self.var_baseline, VAR_BASELINES)
        check_option("var_logp_reduction", self.var_logp_reduction, REDUCTIONS)
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                "num_generations must be >= 2: online VAR normalises each prompt's weights over its "
                f"num_generations completions, got {self.num_generations!r}"
            )
        if self.beta != 0.0:
            raise ValueError(
                f"beta is GRPO's KL coefficient and must be 0.0 for online VAR, got {self.beta!r}: OnlineVARTrainer "
                "has no KL term. VAR's own temperature is var_beta (the target ∝ π_ref·exp(r/var_beta)), and the "
                "initial model is kept as the reference by var_reference='initial' (the default): leave beta at 0.0 "
                "and tune var_beta"
            )
        if self.entropy_coef not in (0, 0.0) or self.use_adaptive_entropy:
            raise ValueError(
                f"entropy_coef must be 0 and use_adaptive_entropy False for online VAR, got {self.entropy_coef!r} and "
                f"{self.use_adaptive_entropy!r}: the loss's gradient is computed in its forward by kernels that give "
                "the entropy but not its gradient, so there is no entropy bonus (top_entropy_quantile works)"
            )
        if self.sync_ref_model and self.var_reference != "initial":
            raise ValueError(f"sync_ref_model=True syncs the reference model of var_reference='initial', got "
                             f"var_reference={self.var_reference!r}, which keeps none")
        if self.off_policy_mask_threshold is not None:
            raise ValueError(
                f"off_policy_mask_threshold must be None for online VAR, got {self.off_policy_mask_threshold!r}"
            )
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        try:
            super().__post_init__()  # sets steps_per_generation from generation_batch_size (or the reverse)
        finally:  # GRPO gathers over accelerate's processes (GRPOConfig's batch checks count them too): one count
            dist, state = torch.distributed, getattr(self, "distributed_state", None)
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            if state is not None and state.num_processes != world:
                raise ValueError(f"accelerate counts {state.num_processes} process(es) but torch.distributed has "
                                 f"{world} (DeepSpeed without an accelerator): GRPO's generation would fail in its "
                                 "all_gather. Online training on CPU: DDP (use_cpu=True, no deepspeed); docs/online.md")
        self.check_fresh_generations()
        quiet_on_cpu(self)

    def check_fresh_generations(self):
        """var_baseline="mean" is right at the sampling policy only: no generation batch may span optimizer steps."""
        spg, ga = self.steps_per_generation, self.gradient_accumulation_steps
        if self.var_baseline == "mean" and (self.num_iterations != 1 or ga % spg):
            raise ValueError(
                f"var_baseline='mean' needs fresh generations at every optimizer step, got num_iterations="
                f"{self.num_iterations}, steps_per_generation={spg} (generation_batch_size={self.generation_batch_size}"
                f") and gradient_accumulation_steps={ga}: set num_iterations=1 and a steps_per_generation that divides "
                "gradient_accumulation_steps (the default: equal), or var_baseline='none'"
            )


class OnlineVARTrainer(CompleteCheckpoints, GRPOTrainer):
    """``GRPOTrainer`` (same arguments, ``args`` an :class:`OnlineVARConfig`) with online VAR's weighted NLL as loss."""

    _tag_names = ["trl", "var", "online-var"]
    _name = "OnlineVAR"

    def __init__(self, model, reward_funcs=None, args: Optional[OnlineVARConfig] = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = OnlineVARConfig(f"{(name or 'model').split('/')[-1]}-OnlineVAR")
        if not isinstance(args, OnlineVARConfig):
            raise TypeError(f"args must be an OnlineVARConfig, got {type(args).__name__}")
        args.check_fresh_generations()  # again: the options may have been changed since the config was made
        _check_prompts(train_dataset, "train_dataset")
        _check_prompts(eval_dataset, "eval_dataset")
        # "initial" needs π_ref, the model as it is now: copy a module before GRPOTrainer patches its forward
        ref = None
        if args.var_reference == "initial" and peft_config is None and isinstance(model, torch.nn.Module) \
                and not _grpo.is_peft_model(model):
            ref = copy.deepcopy(model)
            # a forward patched by an earlier TRL trainer is bound to the original model: use the class's
            ref.__dict__.pop("forward", None)
        sync, args.sync_ref_model = args.sync_ref_model, False  # GRPO refuses it at beta=0: added below
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             reward_processing_classes=reward_processing_classes, callbacks=callbacks,
                             optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config,
                             **kwargs)
        finally:
            args.sync_ref_model = sync
        self.reward_funcs = [f if isinstance(f, torch.nn.Module) else _checked_reward_func(f, n)  # callables
                             for f, n in zip(self.reward_funcs, self.reward_func_names)]
        self._var_rewards_per_func = None
        self._var_heads = {}
        if args.var_reference == "initial" and not _grpo.is_peft_model(self.model):
            if ref is None:  # model given as a path: load it again, as GRPOTrainer loads its reference
                init_kwargs = dict(args.model_init_kwargs or {})
                init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
                init_kwargs.setdefault("dtype", self.model.dtype)
                ref = _grpo.create_model_from_path(_grpo.get_config_model_id(self.model.config), **init_kwargs)
            ref.requires_grad_(False).eval()
            if args.disable_dropout:
                _grpo.disable_dropout_in_model(ref)
            _grpo.add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            if self.is_deepspeed_enabled:
                ref = _grpo.prepare_deepspeed(ref, self.accelerator)
            elif self.is_fsdp_enabled:
                ref = _grpo.prepare_fsdp(ref, self.accelerator)
            else:
                ref = self.accelerator.prepare_model(ref, evaluation_mode=True)
            self.ref_model = ref
        if args.sync_ref_model:  # π_ref ← α·π_θ + (1 − α)·π_ref as GRPO's: the target moves (docs/online.md)
            if self.ref_model is None:
                raise ValueError("sync_ref_model=True needs a reference model; under PEFT the reference is the "
                                 "adapter switched off, which cannot be synced: set sync_ref_model=False")
            self.add_callback(_grpo.SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        # reward models (nn.Module) return logits: a NaN there is an error, not TRL's "None" (callables
        # are checked by their wrapper, which sees None and NaN apart)
        for i, f in enumerate(self.reward_funcs):
            bad = (~torch.isfinite(rewards_per_func[:, i])).nonzero()
            if isinstance(f, torch.nn.Module) and len(bad):
                j = int(bad[0][0])
                raise ValueError(f"reward model {self.reward_func_names[i]!r} returned {float(rewards_per_func[j, i])} "
                                 f"for completion {j} of the generation batch (gathered over ranks)")
        self._var_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rpf = self._var_rewards_per_func  # [M_global, F], every rank's completions in rank order
        self._var_rewards_per_func = None
        valid = ~torch.isnan(rpf).all(dim=1)
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        q = None
        if self.args.var_reference == "initial":
            q = self.accelerator.gather(self._var_log_ratio(out, mode))
            bad = (q.isnan() | (q == math.inf)).nonzero()  # −inf is legal: π_ref rules the completion out (w = 0)
            if len(bad):
                raise FloatingPointError(f"q = Σ_t (log π_ref − log π_old) of completion {int(bad[0])} of the "
                                         f"generation batch is {float(q[bad[0]])}: the policy or the reference model "
                                         "gave a non-finite log-probability (check their weights and dtype)")
        weights = online_var_weights(rewards, G, self.args.var_beta, q=q, valid=valid)
        self._metrics[mode]["var/weights_max"].append(float(weights.max()))  # of the weights before any centring
        self._metrics[mode]["var/ess"].append(float(group_ess(weights, weights.numel() // G)))
        if self.args.var_baseline == "mean":  # w − 1 over the scorable completions (not w > 0: exp may underflow)
            weights = torch.where(valid, weights - 1.0, 0.0)
        n_local = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * n_local
        out["var_weights"] = weights[start: start + n_local].to(out["completion_ids"].device)
        # the completions table's "advantage" column: the weights trained on (centred under var_baseline="mean")
        logged = self._logs["advantages"]
        for _ in range(min(len(weights), len(logged))):  # a deque
            logged.pop()
        logged.extend(weights.tolist())
        return out

    @torch.no_grad()
    def _var_log_ratio(self, batch, mode) -> torch.Tensor:
        """q = Σ_t (log π_ref − log π_old) over each local completion's tokens: [n_local] fp32."""
        input_ids, attention_mask, mask = _sequences(batch)
        keep = batch["completion_ids"].size(1)
        size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size

        def logps(model):
            return self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, keep, batch_size=size)[0]

        old = batch.get("old_per_token_logps")
        old = logps(self.model) if old is None else old
        if self.ref_model is not None:
            ref = logps(self.ref_model)
        else:  # PEFT: the base model is the adapter switched off (or the adapter saved as "ref")
            peft_model = self.accelerator.unwrap_model(self.model)
            with _grpo.use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
                ref = logps(self.model)
        return ((ref.float() - old.float()) * mask).sum(dim=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("OnlineVARTrainer does not support returning outputs")
        input_ids, attention_mask, mask = _sequences(inputs)
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        labels = torch.cat([torch.full_like(prompt_ids, -100), completion_ids.masked_fill(mask == 0, -100)], dim=1)
        head, P = self._var_head(model), prompt_ids.size(1)
        opts = dict(shift_labels=True, temperature=self.temperature, softcap=head.softcap)
        inputs_ = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.aux_loss_enabled:  # MoE: the model returns its load-balancing loss
            inputs_["output_router_logits"] = True

        def var_loss(nll, logps, *args, **kw):  # NLLOutput(loss, policy_logps, entropy): entropy from the same sweep
            weights = inputs["var_weights"]
            if self.top_entropy_quantile < 1.0:  # GRPO's high-entropy tokens, known before the loss's forward
                with torch.no_grad():  # per-token entropy [N, L], the shifted labels' positions
                    ent = logps(*args, labels, reduction="none", return_entropy=True, **kw, **opts)[1]
                keep = self.get_high_entropy_mask(ent[:, P - 1:-1], mask, 1 - self.top_entropy_quantile)
                weights = torch.cat([torch.zeros_like(prompt_ids, dtype=torch.float32), weights[:, None] * keep], 1)
            return nll(*args, labels, weights, reduction=self.args.var_logp_reduction, return_aux=True, **kw, **opts)

        if head.in_head:
            def loss_fn(hidden, weight, bias):  # cast_lm_head_to_fp32: as GRPO, the head in float32 outside autocast
                fp32 = self.args.cast_lm_head_to_fp32
                with torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext():
                    hidden, weight, bias = (t.float() if fp32 and t is not None else t for t in (hidden, weight, bias))
                    return var_loss(linear_weighted_nll, linear_sequence_logps, hidden, weight, bias=bias)

            out, outputs = head.run_in_head(model, inputs_, loss_fn, with_outputs=True)
        else:  # a LoRA / quantised head: the model's logits
            outputs = model(**inputs_)
            out = var_loss(weighted_nll, sequence_logps, outputs.logits)
        mode = "train" if self.model.training else "eval"  # GRPO's entropy metric: token mean over every rank
        n = mask.sum(dim=1).float()  # out.entropy: [N] each completion's mean over its n tokens
        totals = self.accelerator.reduce(torch.stack([torch.where(n > 0, out.entropy * n, 0.0).sum(), n.sum()]), "sum")
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        loss = out.loss
        if self.aux_loss_enabled:  # as GRPO adds it (and logs it)
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        return loss / self.current_gradient_accumulation_steps if self.model.training else loss

    def _var_head(self, model) -> LMHead:
        lm = unwrap_model(model)
        head = self._var_heads.get(id(lm))
        if head is None or head.module is not lm.get_output_embeddings():
            head = self._var_heads[id(lm)] = LMHead(model)
        return head


def _sequences(batch):
    """(input_ids, attention_mask, completion mask without tool tokens) of a GRPO batch: prompt ⊕ completion."""
    mask = batch["completion_mask"] if "tool_mask" not in batch else batch["completion_mask"] * batch["tool_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    return input_ids, torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1), mask


def _check_prompts(dataset, arg: str):
    """Before any generation: rows, and a ``prompt`` column of non-blank strings or conversations (one read of the
    column: 0.5 s for 1M short strings). A dict: each dataset; a streaming dataset is left to TRL."""
    for k, d in dataset.items() if isinstance(dataset, dict) else ():
        _check_prompts(d, f"{arg}[{k!r}]")
    if isinstance(dataset, Dataset) and (not len(dataset) or "prompt" not in dataset.column_names):
        raise ValueError(f"{arg} must have rows and a 'prompt' column (TRL's prompt-only format) to sample "
                         f"completions for; got {len(dataset)} rows, columns {dataset.column_names}")
    for i, p in enumerate(dataset["prompt"][:] if isinstance(dataset, Dataset) else ()):  # [:]: a list, fast
        if not (p.strip() if isinstance(p, str) else isinstance(p, list) and p and is_conversational({"prompt": p})):
            raise ValueError(f"{arg} row {i}: 'prompt' must be a non-blank string or a non-empty list of chat "
                             f"messages ({{'role': ..., 'content': ...}}), got {type(p).__name__} {p!r:.80}")


def _checked_reward_func(func, name: str):
    """``func`` with its output read by ``as_scores`` as TRL reads it (a list, numpy array or tensor; None: unscorable)
    and returned as a list of float | None; NaN, ±inf, strings or a scalar raise, naming ``func`` and the completion."""

    def check(out, completions):
        scores = as_scores(out, len(completions), name=name,
                           describe=lambda j: f"completion {j} of the batch ({completions[j]!r:.200})")
        return [None if math.isnan(r) else r for r in scores.tolist()]

    if _grpo.is_async_callable(func):  # TRL's own test, so the wrapper is awaited where func would be
        @functools.wraps(func)
        async def checked_async(*args, **kwargs):
            return check(await call_reward_func(func, name, *args, **kwargs), kwargs["completions"])

        return checked_async

    @functools.wraps(func)
    def checked(*args, **kwargs):
        return check(call_reward_func(func, name, *args, **kwargs), kwargs["completions"])

    return checked
