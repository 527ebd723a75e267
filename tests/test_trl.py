"""TRL's SFTTrainer trains with the VAR loss (the recipe of docs/trainer.md, run as written)."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="test extra: pip install trl")
pytest.importorskip("datasets", reason="test extra: pip install datasets")

from tiny_trainer import V, assert_close, make_dataset, tiny_llama  # noqa: E402

from varkernels.training.data import VARCollator  # noqa: E402
from varkernels.training.trainer import compute_var_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the recipe (docs/trainer.md, "TRL's SFTTrainer") -------------------------------------------
from trl import SFTConfig, SFTTrainer  # noqa: E402

# SFTConfig turns gradient checkpointing on by default; transformers ≥ 5.24 calls that field
# activation_checkpointing and warns about the old name (a tiny model does not need it anyway)
_NEW_NAME = "activation_checkpointing" in {f.name for f in dataclasses.fields(SFTConfig)}
NO_CHECKPOINTING = {"activation_checkpointing" if _NEW_NAME else "gradient_checkpointing": False}


class VARSFTTrainer(SFTTrainer):
    loss_is_scaled_for_ga = False  # a per-micro-batch mean: Trainer divides by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_var_loss(model, inputs, beta=1.0, weighting="posterior", logp_reduction="mean")
        return (out.loss, out) if return_outputs else out.loss
# -------------------------------------------------------------------------------------------------


def tiny_tokenizer():
    """A word-level tokenizer over the tiny model's V ids (SFTTrainer wants a processing_class)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(V)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")


def test_sft_trainer_recipe_equals_a_plain_replay(tmp_path):
    ds = make_dataset()  # 2 groups of 4
    policy = tiny_llama()
    args = SFTConfig(
        output_dir=str(tmp_path), remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        per_device_train_batch_size=2, max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=1,
        **NO_CHECKPOINTING,
    )
    trainer = VARSFTTrainer(model=policy, args=args, train_dataset=ds.to_hf_dataset(),
                            data_collator=VARCollator(pad_token_id=ds.pad_token_id), processing_class=tiny_tokenizer())
    trainer.train()
    assert trainer.state.global_step == 2

    # a plain replay: 2 SGD steps on the mean VAR loss of the batch of both groups, in SFTConfig's
    # precision (bf16=True by default where bf16 works: accelerate autocasts the model's forward)
    replay = tiny_llama()
    if trainer.args.bf16:
        replay.forward = torch.autocast("cpu", dtype=torch.bfloat16)(replay.forward)
    opt = torch.optim.SGD(replay.parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        compute_var_loss(replay, VARCollator()([ds[0], ds[1]])).loss.backward()
        opt.step()
    start = {n: p.detach() for n, p in tiny_llama().named_parameters()}
    moved = 0.0
    for n, p in replay.named_parameters():
        got = dict(policy.named_parameters())[n]
        assert_close(got, p, name=n)
        moved = max(moved, float((p.detach() - start[n]).abs().max()))
    assert moved > 1e-3


def test_sft_trainer_default_remove_unused_columns_names_the_setting(tmp_path):
    """SFTConfig's default remove_unused_columns=True keeps only TRL's signature columns; the
    collator's error names what is missing and the setting, instead of a bare KeyError."""
    ds = make_dataset()
    args = SFTConfig(output_dir=str(tmp_path), dataset_kwargs={"skip_prepare_dataset": True}, max_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, **NO_CHECKPOINTING)
    trainer = VARSFTTrainer(model=tiny_llama(), args=args, train_dataset=ds.to_hf_dataset(),
                            data_collator=VARCollator(), processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match=r"no \['attention_mask', 'rewards', 'ref_logps'\].*remove_unused_columns"):
        trainer.train()
