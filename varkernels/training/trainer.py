"""VAR training with ``transformers``: ``VARConfig``, ``VARTrainer`` and ``compute_var_loss`` (the loss of k
whole groups, computed inside the output embedding's forward): docs/trainer.md, "VARConfig and VARTrainer".
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .._extras import missing_extra

try:
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
    from trl.trainer.utils import create_model_from_path, get_config_model_id
except ImportError as e:  # the scoring and data modules of varkernels.training work without it
    raise missing_extra(e.name or "transformers", "train", "varkernels.training.trainer") from e

from .._validation import (  # noqa: E402
    BACKENDS,
    VAROutput,
    check_option,
    check_options,
    check_pair_inputs,
    check_positive_int,
)
from .data import VARCollator, VARDataset
from .groups import VAR_COLUMNS, check_group_size
from .lm_head import LMHead
from .rewards import RewardFunctions, TextPairRewards
from .text import column_names, tokenize_examples

logger = logging.getLogger(__name__)


def split_groups(batch: dict) -> tuple[int, int, bool]:
    """(k groups, B per group, cross_pairs) of a collated batch: rewards/ref_logps [k, B, B] or [k, B] (one group
    also [B, B] or [B]), by the loss's rules (``_validation.check_pair_inputs``); ValueError on bad shapes."""
    for name in ("input_ids", "labels", "rewards", "ref_logps"):
        if name not in batch:
            raise ValueError(
                f"batch is missing {name!r}: expected input_ids/attention_mask/labels [k*B, T] and "
                "rewards/ref_logps [k, B, B] or [k, B] (see varkernels.training.data.VARCollator)"
            )
    N = batch["input_ids"].shape[0]
    try:  # the loss's own shape rules, with where the row count comes from
        return check_pair_inputs(batch["rewards"], batch["ref_logps"], N)
    except ValueError as e:
        raise ValueError(f"batch: {e} (k*B = input_ids.shape[0] = {N} rows)") from None


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
        model: a causal LM, possibly wrapped (DDP, DeepSpeed, PEFT, ``torch.compile``) or sharded (FSDP2), called
            through its wrappers so that their hooks fire.
        batch: ``input_ids`` / ``attention_mask`` / ``labels`` [k·B, T] (labels = the response tokens, unshifted,
            ``ignore_index`` elsewhere) and ``rewards`` / ``ref_logps`` [k, B, B] or [k, B].
        use_fused_linear: the loss inside the head (no logits; docs/trainer.md, "VARConfig and VARTrainer");
            False, or a head that is not a plain ``nn.Linear``: the model's logits and ``fused_var_loss``.
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
            # all k groups in one call: each normalised inside itself, one fp32 weight-gradient accumulator
            return varkernels.fused_linear_var_loss(hidden, weight, labels, R, Q, bias=bias, chunk_size=chunk_size,
                                                    **opts)

        return head.run_in_head(model, inputs, loss_in_head)

    logits = model(**inputs).logits
    return varkernels.fused_var_loss(logits, labels, R, Q, **opts)


@dataclass
class VARConfig(TrainingArguments):
    """``TrainingArguments`` plus the VAR loss options and, for text datasets, TRL's data options (docs/trainer.md).
    ``per_device_train_batch_size`` counts whole groups of B examples (B = ``group_size``, or the pre-built
    dataset's); ``remove_unused_columns`` stays False, so that ``rewards`` / ``ref_logps`` reach the loss."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]  # JSON strings parsed, as TRL's

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
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (TRL's default; transformers' 500)."})
    # str, not TrainingArguments' `str | bool`, which TRL's parser reads as a bool (it refuses "non_padding")
    include_num_input_tokens_seen: str = field(
        default="non_padding", metadata={"help": "'all' | 'non_padding' | 'no': Trainer's token count (num_tokens)."}
    )
    # --- text datasets (TRL's names where TRL has them)
    group_size: int = field(default=8, metadata={"help": "B >= 2: examples per VAR group (one in-batch Ẑ)."})
    cross_pairs: Optional[bool] = field(
        default=None,
        metadata={"help": "R, Q as [B, B] (every prompt with every completion of its group) or [B]. "
                          "None: True with reward_funcs, False with a 'reward' column."},
    )
    max_length: Optional[int] = field(default=1024, metadata={"help": "Max tokens of prompt + completion."})
    max_prompt_length: Optional[int] = field(default=None, metadata={"help": "Max prompt tokens (keeps the end)."})
    max_completion_length: Optional[int] = field(
        default=None, metadata={"help": "Max completion tokens (keeps the start)."}
    )
    model_init_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "from_pretrained keywords for model / ref_model / reward models given as paths (a dict or "
                          "a JSON string), e.g. {\"dtype\": \"bfloat16\"}."},
    )
    reward_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "One weight per reward function (default all 1)."}
    )
    score_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Folder of the score cache (None: <output_dir>/var_scores)."}
    )
    score_cache: bool = field(default=True, metadata={"help": "Cache the scores of text datasets on disk."})
    scoring_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Sequences per forward when scoring (None: B)."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_options(beta=self.beta, weighting=self.weighting, logp_reduction=self.logp_reduction)
        check_option("loss_backend", self.loss_backend, BACKENDS)
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False for VAR: it would drop rewards and ref_logps")
        check_group_size(self.group_size)
        for name in ("max_length", "max_prompt_length", "max_completion_length", "scoring_batch_size",
                     "loss_chunk_size"):
            check_positive_int(name, getattr(self, name), allow_none=True)
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise TypeError(f"model_init_kwargs must be a dict or None, got {type(self.model_init_kwargs).__name__}")
        quiet_on_cpu(self)


def quiet_on_cpu(args) -> None:
    """Without an accelerator: no pinned memory (the DataLoader warns it cannot use it), a warning if FSDP is asked
    for and, unless DeepSpeed is configured, no "Setting accelerator to CPU" from DeepSpeed (imported by accelerate)."""
    if args.use_cpu or not torch.accelerator.is_available():
        args.dataloader_pin_memory = False
        if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # accelerate: on accelerators
            warnings.warn("FSDP was asked for, but on CPU accelerate does not shard (DDP over several processes): to "
                          "shard on CPU apply torch.distributed.fsdp.fully_shard yourself and call the loss in your "
                          "own loop (docs/trainer.md, 'Distributed, sharded and compiled training')", stacklevel=4)
        if not args.deepspeed and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
            logging.getLogger("DeepSpeed").addFilter(_drop_cpu_notice)


def _drop_cpu_notice(record) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


_METRICS = ("weights_mean", "weights_min", "weights_max", "ess", "log_z", "policy_logps", "ref_logps", "rewards")
# TRL's names (GRPOTrainer): the mean reward (= var/rewards) and the mean of the groups' reward std
_TRL_METRICS = {"reward": 7, "reward_std": 8}


def _is_var_data(ds) -> bool:
    if isinstance(ds, dict):  # several eval datasets
        return all(_is_var_data(v) for v in ds.values())
    if ds is None or isinstance(ds, (VARDataset, torch.utils.data.Dataset)) and not hasattr(ds, "column_names"):
        return True
    try:
        return set(VAR_COLUMNS) <= set(column_names(ds))
    except Exception:  # noqa: BLE001 - not a table: leave it to Trainer
        return True


class CompleteCheckpoints:
    """Mixin of both trainers: ``resume_from_checkpoint=True`` takes the newest complete checkpoint (docs/trainer.md,
    "Checkpoints"). Trainer writes trainer_state.json last: a folder without a readable one is a save cut short."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            found = sort_checkpoints(self.args.output_dir)[::-1]  # newest first
            n = next((i for i, path in enumerate(found) if _complete(path)), None)
            skipped = ", ".join(os.path.basename(path) for path in found[:n])
            if n is None:
                raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint (with a readable "
                                 f"{TRAINER_STATE_NAME}) in output_dir={self.args.output_dir!r}; incomplete: "
                                 f"{skipped or 'none'}")
            resume_from_checkpoint = found[n]
            logger.log(logging.WARNING if n else logging.INFO, "resume_from_checkpoint=True: resuming from %s%s",
                       found[n], f"; skipped the newer {skipped}: no readable {TRAINER_STATE_NAME} (a save cut "
                       "short)" if n else "")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        if self.args.should_save:  # an old trainer_state.json there would make a save cut short look complete
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            Path(self._get_output_dir(trial), folder, TRAINER_STATE_NAME).unlink(missing_ok=True)
        super()._save_checkpoint(model, trial)


def _complete(checkpoint: str) -> bool:
    try:
        return isinstance(json.loads(Path(checkpoint, TRAINER_STATE_NAME).read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


class VARTrainer(CompleteCheckpoints, Trainer):
    """``transformers.Trainer`` training a causal LM with the VAR loss, from text or from a ``VARDataset``. Arguments
    have TRL's names and meanings (``ref_model=None``: the initial policy); text datasets are tokenised and scored in
    ``__init__`` (``trainer.dropped_examples`` counts the fully masked examples). The arguments, the text formats and
    what is logged: docs/trainer.md, "VARTrainer from text" and after."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean: Trainer divides by GA steps

    def __init__(self, model=None, ref_model=None, args: Optional[VARConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, reward_funcs=None,
                 reward_processing_classes=None, peft_config=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = VARConfig(output_dir=f"{str(name or 'model').rstrip('/').split('/')[-1]}-VAR")
        if not isinstance(args, VARConfig):
            raise TypeError(f"args must be a varkernels.training.VARConfig, got {type(args).__name__}")
        if isinstance(model, str):  # as TRL's trainers load it (dtype strings, device_map)
            model = create_model_from_path(model, **(args.model_init_kwargs or {}))
        if isinstance(ref_model, str):
            ref_model = create_model_from_path(ref_model, **(args.model_init_kwargs or {})).eval()
        text = not (_is_var_data(train_dataset) and _is_var_data(eval_dataset))
        path = get_config_model_id(getattr(model, "config", None))
        if text and processing_class is None and path:  # as TRL's trainers: the model's own tokenizer
            processing_class = AutoTokenizer.from_pretrained(path)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if not text:
            for name, ds in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                reduction = getattr(ds, "reduction", None)
                if reduction is not None and reduction != args.logp_reduction:
                    raise ValueError(
                        f"{name} was scored with reduction={reduction!r} but args.logp_reduction="
                        f"{args.logp_reduction!r}: the reference and policy log-probs must be reduced alike"
                    )
            if reward_funcs is not None:
                raise ValueError("reward_funcs score text datasets; the given datasets are already scored (VARDataset)")
        if data_collator is None:
            if text:
                pad = processing_class.pad_token_id
                pad = pad if pad is not None else processing_class.eos_token_id
                data_collator = VARCollator(pad_token_id=pad if pad is not None else 0)
            else:
                ds = train_dataset if train_dataset is not None else eval_dataset
                data_collator = VARCollator(pad_token_id=getattr(ds, "pad_token_id", 0),
                                            ignore_index=getattr(ds, "ignore_index", -100))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.ref_model, self.reward_funcs = ref_model, None
        self.dropped_examples: dict = {}
        if text:  # scored here, after Trainer has put the model on its device
            if reward_funcs is not None:
                self.reward_funcs = RewardFunctions(
                    reward_funcs, args.reward_weights, reward_processing_classes,
                    model_init_kwargs=args.model_init_kwargs, batch_size=args.scoring_batch_size,
                )
                for f in self.reward_funcs.funcs:
                    if isinstance(f, torch.nn.Module):
                        f.to(args.device).eval()
            elif args.reward_weights is not None:
                raise ValueError("args.reward_weights is set but no reward_funcs were given")
            if ref_model is not None:
                ref_model.to(args.device).eval()
            self.train_dataset = self._score_text(train_dataset, "train_dataset")
            if isinstance(eval_dataset, dict):
                self.eval_dataset = {k: self._score_text(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
            else:
                self.eval_dataset = self._score_text(eval_dataset, "eval_dataset")
        self._var_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _score_text(self, dataset, name: str):
        """A text dataset → tokenised examples → ``VARDataset.build`` (scored and cached); others as they are."""
        if _is_var_data(dataset):
            return dataset
        args, tok, policy = self.args, self.processing_class, self.model
        examples = tokenize_examples(
            dataset, tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
            max_completion_length=args.max_completion_length, vocab_size=LMHead(policy).vocab_size, name=name,
        )
        self.dropped_examples[name] = examples.dropped
        if self.reward_funcs is not None:
            reward, example_rewards = TextPairRewards(
                self.reward_funcs, examples.prompt_texts, examples.completion_texts, columns=examples.columns,
                completion_ids=[c.tolist() for c in examples.completions], example_names=examples.names,
            ), None
        elif "reward" in examples.columns and examples.format == "prompt_completion":
            reward, example_rewards = None, examples.columns["reward"]
        else:
            raise ValueError(
                f"{name} holds text: pass reward_funcs (callables on text or reward models, TRL's contract) or give "
                "the prompt/completion dataset a 'reward' column (one number per example)"
            )
        if len(examples) < args.group_size:
            raise ValueError(
                f"{name} has {len(examples)} examples after tokenisation, fewer than group_size={args.group_size}"
            )
        ref = self.ref_model if self.ref_model is not None else policy
        initial = self.ref_model is None and hasattr(policy, "disable_adapter")
        cache_dir = (args.score_cache_dir or os.path.join(args.output_dir, "var_scores")) if args.score_cache else None
        pad = self.data_collator.pad_token_id if isinstance(self.data_collator, VARCollator) else 0
        with policy.disable_adapter() if initial else nullcontext():
            ds = VARDataset.build(
                examples.prompts, examples.completions, ref_model=ref, reward=reward, example_rewards=example_rewards,
                group_size=args.group_size, seed=args.data_seed if args.data_seed is not None else args.seed,
                cross_pairs=args.cross_pairs, reduction=args.logp_reduction, batch_size=args.scoring_batch_size,
                cache_dir=cache_dir, pad_token_id=pad, progress=None if not args.disable_tqdm else False,
            )
        ds.examples = examples
        logger.info("%s: %d examples in %d groups of %d (%d dropped)", name, len(examples), len(ds),
                    args.group_size, examples.dropped)
        return ds

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        out = compute_var_loss(
            model, inputs, beta=args.beta, weighting=args.weighting, logp_reduction=args.logp_reduction,
            use_fused_linear=args.use_fused_linear, chunk_size=args.loss_chunk_size, backend=args.loss_backend,
        )
        self._record("train" if model.training else "eval", out, inputs)
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            return self.compute_loss(model, self._prepare_inputs(inputs)).detach(), None, None

    def _record(self, mode: str, out: VAROutput, inputs: dict) -> None:
        w = out.weights.detach()
        R, Q = inputs["rewards"], inputs["ref_logps"]
        diag_r = R.diagonal(dim1=-2, dim2=-1) if R.dim() == 3 else R
        diag_q = Q.diagonal(dim1=-2, dim2=-1) if Q.dim() == 3 else Q
        diag_r = diag_r.float().reshape(-1, diag_r.shape[-1])  # [k, B]
        vals = torch.stack([
            w.mean(), w.min(), w.max(), out.ess.detach(), out.log_z.detach().mean(), out.policy_logps.detach().mean(),
            diag_q.float().mean(), diag_r.mean(), diag_r.std(dim=1).mean(),
        ]).float()
        self._var_metrics[mode]["step"].append(vals)  # no host sync here; one .tolist() at log time

    def _track_num_input_tokens(self, inputs):
        """transformers' token count, except under DeepSpeed on CPU (gloo), where accelerate counts one process and
        its gather fails: there the ranks' counts are summed by all_reduce (tests/test_distributed.py, ZeRO-3)."""
        dist, how = torch.distributed, self.args.include_num_input_tokens_seen
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if how == "no" or self.accelerator.num_processes == world:
            return super()._track_num_input_tokens(inputs)
        mask = inputs.get("attention_mask")
        count = mask.sum() if mask is not None and how == "non_padding" else torch.tensor(inputs["input_ids"].numel())
        count = count.to(torch.int64).reshape(1)
        dist.all_reduce(count)
        self.state.num_input_tokens_seen += int(count.item())

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
            logs.update({f"{prefix}{name}": round(agg[i], 6) for name, i in _TRL_METRICS.items()})
        if mode == "train" and self.args.include_num_input_tokens_seen != "no":
            logs["num_tokens"] = self.state.num_input_tokens_seen  # TRL's name for Trainer's count
        super().log(logs, start_time)


__all__ = ["VARConfig", "VARTrainer", "compute_var_loss", "split_groups", "VARDataset", "VARCollator"]
