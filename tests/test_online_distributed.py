"""OnlineVARTrainer under 2 processes (gloo, CPU): FSDP2, accelerate's FSDP options, DeepSpeed ZeRO-3.

One spawn of 2 workers serves the three tests (each spawn costs the imports of torch, transformers, TRL
and DeepSpeed in both processes):

- FSDP2 with ``fully_shard`` applied by hand (as tests/test_distributed.py does for ``VARTrainer``):
  ``OnlineVARTrainer.compute_loss`` on the sharded policy, each rank its half of one prompt's group
  (sampled and weighted by the trainer's own step), against one process on both halves; compared under
  the tolerance policy of tests/helpers.py with a float64 plain-PyTorch truth;
- ``fsdp=True, fsdp_config={"version": 2}`` on CPU: accelerate trains with DDP instead, and the config
  says so in a warning;
- DeepSpeed ZeRO-3 on CPU: accelerate counts one process where torch.distributed has two, and GRPO's
  generation gathers over accelerate's count; the config refuses it when it is made, naming the cause.
"""

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
datasets = pytest.importorskip("datasets")

from _distributed import _init, _leave, _run  # noqa: E402
from helpers import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from _toy import MAX_NEW, Language  # noqa: E402
from _toy import tiny_llama as toy_llama  # noqa: E402
from compare_methods import toy_text, toy_tokenizer, trl_reward  # noqa: E402

from varkernels.training.online import OnlineVARConfig, OnlineVARTrainer  # noqa: E402
from varkernels.training.trainer import VARConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
G = 4  # completions of the step's one prompt, 2 on each rank
ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
         "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}


def online_args(out_dir, **kw):
    base = dict(output_dir=out_dir, per_device_train_batch_size=2, num_generations=G, max_completion_length=MAX_NEW,
                max_steps=1, learning_rate=1e-3, report_to=[], save_strategy="no", disable_tqdm=True, bf16=False,
                var_beta=0.2, seed=0, var_reference="policy")
    return OnlineVARConfig(**{**base, **kw})


def toy_setup():
    torch.manual_seed(0)
    tok, names = toy_tokenizer()
    prompts = datasets.Dataset.from_dict({"prompt": [toy_text(names, x) for x in Language(0).prompts(8)]})
    return toy_llama(), tok, names, prompts


def _zero3_part(out_dir, per_device):
    """ZeRO-3 through OnlineVARConfig(deepspeed=...): (where it failed, the error)."""
    model, tok, names, prompts = toy_setup()  # before the config: transformers then builds under zero.Init
    try:
        args = online_args(os.path.join(out_dir, "zero3"), deepspeed=ZERO3, ddp_backend="gloo",
                           per_device_train_batch_size=per_device)
    except ValueError as exc:
        return ("config", str(exc))
    try:  # without the check: the trainer is built, and training fails in TRL's generation
        OnlineVARTrainer(model=model, reward_funcs=trl_reward(names), args=args, train_dataset=prompts,
                         processing_class=tok).train()
    except Exception as exc:  # noqa: BLE001 - recorded for the test's message
        return ("train", f"{type(exc).__name__}: {exc}")
    return ("none", "")


def _worker(rank, world_size, port, out_dir):
    os.environ["DS_ACCELERATOR"] = "cpu"
    dist = _init(rank, world_size, port)
    try:
        import deepspeed
        from torch.distributed.fsdp import fully_shard

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # as tests/test_distributed.py
        deepspeed.init_distributed(dist_backend="gloo")
        # 4 per device: GRPOConfig's batch checks pass on accelerate's count of 1 process; 2: they do not
        zero3 = {n: _zero3_part(out_dir, n) for n in (4, 2)}
        # the FSDP part without DeepSpeed (each config sets accelerate's state up anew)
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)

        # accelerate's FSDP options on CPU: the trainer's step runs under DDP (and samples the batch used below)
        model, tok, names, prompts = toy_setup()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = online_args(os.path.join(out_dir, "fsdp"), fsdp=True, fsdp_config={"version": 2}, use_cpu=True)
        trainer = OnlineVARTrainer(model=model, reward_funcs=trl_reward(names), args=args, train_dataset=prompts,
                                   processing_class=tok)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        inner, seen = trainer._generate_and_score_completions, []
        trainer._generate_and_score_completions = lambda inputs: seen.append(inner(inputs)) or seen[-1]
        trainer.train()
        fallback = {"warnings": [str(w.message) for w in caught], "wrapper": type(trainer.model_wrapped).__name__,
                    "distributed_type": str(trainer.accelerator.distributed_type),
                    "fsdp_enabled": trainer.is_fsdp_enabled}
        batch = {k: v for k, v in seen[0].items() if isinstance(v, torch.Tensor)}  # this rank's half of the group

        # FSDP2 by hand: the loss of this rank's half on the sharded policy (as at generation: π_old)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        sharded = toy_llama()
        sharded.load_state_dict(start)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        trainer.compute_loss(sharded, batch).backward()
        fsdp_grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}

        # one process on both halves (each rank computes it: compute_loss gathers its entropy metric)
        halves = [None] * world_size
        dist.all_gather_object(halves, batch)
        whole = concat(halves)
        single = toy_llama()
        single.load_state_dict(start)
        trainer.compute_loss(single, whole).backward()
        single_grads = {n: p.grad.detach().clone() for n, p in single.named_parameters()}
        if rank == 0:
            torch.save({"zero3": zero3, "fallback": fallback, "fsdp": fsdp_grads, "single": single_grads,
                        "batch": whole, "start": start}, os.path.join(out_dir, "results.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave(dist)


def concat(halves):
    """The ranks' batches as one: prompts are of one length (the toy language's); completions are padded
    on the right (pad tokens outside completion_mask leave the earlier positions' logits as they are)."""
    width = max(h["completion_ids"].shape[1] for h in halves)
    assert len({h["prompt_ids"].shape[1] for h in halves}) == 1
    out = {}
    for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "var_weights"):
        parts = [h[k] for h in halves]
        if k.startswith("completion"):
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
        out[k] = torch.cat(parts)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="test extra: pip install deepspeed")
    out = tmp_path_factory.mktemp("online_distributed")
    _run(_worker, str(out), deadline_s=300)
    return torch.load(out / "results.pt")


def plain_grads(start, batch, dtype):
    """Gradient of −mean_i w_i·mean_t log π(y_i,t) from the full logits, plain PyTorch."""
    m = toy_llama()
    m.load_state_dict(start)
    m = m.to(dtype).train()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    lp = torch.log_softmax(m(input_ids=ids, attention_mask=att).logits[:, :-1], -1)
    lp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    cm = batch["completion_mask"].to(dtype)
    s = (lp[:, batch["prompt_ids"].shape[1] - 1:] * cm).sum(1) / cm.sum(1).clamp(min=1)
    (-(batch["var_weights"].to(dtype) * s).mean()).backward()
    return {n: p.grad.detach().clone() for n, p in m.named_parameters()}


def test_fsdp2_two_ranks_equal_one_process(results):
    """fully_shard on the decoder layers and the root; each rank's loss on its 2 of the prompt's 4 completions
    (weights from all 4): the averaged gradients equal one process on all 4, and a float64 truth."""
    batch, fsdp, single = results["batch"], results["fsdp"], results["single"]
    assert batch["completion_ids"].shape[0] == G and float(batch["var_weights"].sum()) == pytest.approx(G, rel=1e-5)
    assert float(batch["var_weights"].max() - batch["var_weights"].min()) > 1e-3  # the weights matter
    truth = plain_grads(results["start"], batch, torch.float64)
    assert set(fsdp) == set(truth)
    for n in truth:
        assert_close(fsdp[n], single[n], truth[n], name=f"FSDP2 online: grad of {n}")
    assert max(float(g.abs().max()) for g in fsdp.values()) > 1e-3  # a real gradient
    abs_d = max(float((fsdp[n] - single[n]).abs().max()) for n in truth)
    rel_d = max(float((fsdp[n] - single[n]).abs().max() / single[n].abs().max()) for n in truth)
    print(f"FSDP2 online: max abs / rel difference from one process {abs_d:.2g} / {rel_d:.2g}")


def test_fsdp_options_on_cpu_warn_that_accelerate_runs_ddp(results):
    """fsdp=True on CPU: accelerate 1.16 applies FSDP on accelerators only and wraps the model in DDP; the
    config warns once, saying so and how to shard on CPU."""
    fb = results["fallback"]
    assert fb["distributed_type"] == "DistributedType.MULTI_CPU" and fb["wrapper"] == "DistributedDataParallel"
    assert not fb["fsdp_enabled"]
    ours = [m for m in fb["warnings"] if "fsdp" in m and "DDP" in m]
    assert len(ours) == 1, fb["warnings"]
    assert "fully_shard" in ours[0] and "on CPU" in ours[0], ours[0]


@pytest.mark.parametrize("make", [VARConfig, OnlineVARConfig])
@pytest.mark.parametrize("how", ["argument", "accelerate launch"])
def test_fsdp_on_cpu_warning_one_process(make, how, tmp_path, monkeypatch):
    """The same warning from both configs, for the fsdp argument and for accelerate's ACCELERATE_USE_FSDP."""
    kw = {"fsdp": True, "fsdp_config": {"version": 2}} if how == "argument" else {}
    if how != "argument":
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    extra = {"num_generations": 2, "per_device_train_batch_size": 2} if make is OnlineVARConfig else {}
    with pytest.warns(UserWarning, match=r"FSDP.*on CPU.*DDP.*fully_shard"):
        make(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw, **extra)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with warnings.catch_warnings(record=True) as caught:  # nothing without FSDP
        warnings.simplefilter("always")
        make(output_dir=str(tmp_path), use_cpu=True, report_to=[], **extra)
    assert not [w for w in caught if "fully_shard" in str(w.message)]


@pytest.mark.parametrize("per_device", [4, 2])
def test_zero3_on_cpu_is_refused_when_the_config_is_made(results, per_device):
    """DeepSpeed ZeRO-3 on 2 CPU processes, where accelerate counts 1 process. Without the check, with 4
    completions per device training stops in TRL's generation ("ProcessGroupGloo::allgather: invalid output
    tensor list"), with 2 GRPOConfig says the generation batch (2 = 2 × 1 process) is not divisible by
    num_generations; the config raises instead, naming both counts, DeepSpeed and what works."""
    where, message = results["zero3"][per_device]
    assert where == "config", f"expected a ValueError from OnlineVARConfig; got {where}: {message}"
    for part in ("DeepSpeed", "counts 1 process", "torch.distributed has 2", "use_cpu=True", "docs/online.md"):
        assert part in message, message
