"""2 processes on gloo (CPU) vs one process over the same groups: FSDP2, DeepSpeed ZeRO-3, scoring.

Each rank takes one whole group; the engines average the ranks' gradients, so the result must
equal one process on the batch of both groups (the loss is the mean of per-group losses). Compared
under the tolerance policy of tests/helpers.py: max |distributed − truth| ≤ 2·max |one process −
truth| + 1e-6·max |truth|, with ``truth`` the float64 reference loss of one process. (DDP: see
tests/test_trainer.py.) Workers run with one torch thread and a deadline, so CI never hangs.
"""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from _distributed import _init, _leave, _run  # noqa: E402
from helpers import assert_close  # noqa: E402
from tiny_trainer import V, make_dataset, parity_reward  # noqa: E402

from varkernels.reference import linear_var_loss_reference  # noqa: E402
from varkernels.training.data import VARCollator, VARDataset  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer, compute_var_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LR = 0.5  # SGD step of the ZeRO-3 comparison


def tiny_llama(seed=0, tied=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(cfg)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def one_process_grads(ds, tied=False, groups=(0, 1)):
    """One process on one batch of ``groups``: (fp32 gradients of compute_var_loss, float64
    reference gradients). With the ranks' batches concatenated (each rank the same number of
    groups) its loss, the mean of the group losses, is what averaging the ranks' gradients gives."""
    batch = VARCollator()([ds[g] for g in groups])
    model = tiny_llama(tied=tied)
    compute_var_loss(model, batch, backend="torch").loss.backward()
    fp32 = grads(model)
    m64 = tiny_llama(tied=tied).double()
    hidden = m64.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    B = ds.group_size
    losses = [
        linear_var_loss_reference(
            hidden[k * B : (k + 1) * B], m64.lm_head.weight, batch["labels"][k * B : (k + 1) * B],
            batch["rewards"][k].double(), batch["ref_logps"][k].double(), shift_labels=True,
        )
        for k in range(len(groups))
    ]
    torch.stack(losses).mean().backward()
    return fp32, grads(m64)


def max_diff(actual: dict, expected: dict) -> tuple[float, float]:
    """(max abs difference, max relative difference to max|expected|) over all tensors."""
    diffs = {n: float((actual[n].double() - expected[n].double()).abs().max()) for n in expected}
    rel = max(diffs[n] / max(float(expected[n].abs().max()), 1e-30) for n in expected)
    return max(diffs.values()), rel


# ----------------------------------------------------------------------------- spawning


# ----------------------------------------------------------------------------- FSDP2

FSDP_CASES = {  # name: (reshard_after_forward for every fully_shard call or None = default, tied, shard lm_head)
    "default": (None, False, False),
    "reshard_after_forward": (True, False, False),
    "tied": (None, True, False),
    "lm_head sharded on its own": (True, False, True),
}


def _fsdp2_worker(rank, world_size, port, ds, out_dir):
    dist = _init(rank, world_size, port)
    try:
        from torch.distributed.fsdp import fully_shard

        for name, (reshard, tied, head_alone) in FSDP_CASES.items():
            model = tiny_llama(tied=tied)
            kw = {} if reshard is None else {"reshard_after_forward": reshard}
            for layer in model.model.layers:
                fully_shard(layer, **kw)
            if head_alone:
                fully_shard(model.lm_head, **kw)  # its class becomes FSDPLinear
            fully_shard(model, **kw)
            out = compute_var_loss(model, VARCollator()([ds[rank]]), backend="torch")
            out.loss.backward()
            # full_tensor() is collective: every rank calls it
            full = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            if rank == 0:
                torch.save(full, os.path.join(out_dir, f"{name.replace(' ', '_')}.pt"))
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave(dist)


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    """fully_shard on the decoder layers and the root (reshard_after_forward default / True, tied
    embeddings, lm_head sharded on its own): compute_var_loss needs no user code, gradients
    equal one process."""
    ds = make_dataset()
    _run(_fsdp2_worker, ds, str(tmp_path))
    for name, (_, tied, _) in FSDP_CASES.items():
        fsdp = torch.load(tmp_path / f"{name.replace(' ', '_')}.pt")
        single, truth = one_process_grads(ds, tied=tied)
        assert set(fsdp) == set(truth), name
        for n in truth:
            assert_close(fsdp[n], single[n], truth[n], name=f"FSDP2 {name}: grad of {n}")
        abs_d, rel_d = max_diff(fsdp, single)
        print(f"FSDP2 {name}: max abs / rel difference from one process {abs_d:.2g} / {rel_d:.2g}")


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-3


def _zero3_worker(rank, world_size, port, ds, out_path):
    os.environ["DS_ACCELERATOR"] = "cpu"
    dist = _init(rank, world_size, port)
    try:
        import sys

        import deepspeed

        # The CPU accelerator JIT-builds a shared-memory all-reduce (a C++ compile); gloo suffices here.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        model = tiny_llama()
        config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                          config=config)
        # outside a forward, ZeRO-3 leaves size-0 placeholders: the loss must run inside lm_head's
        assert engine.module.lm_head.weight.numel() == 0
        out = compute_var_loss(engine, VARCollator()([ds[rank]]), backend="torch")
        engine.backward(out.loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}

        # the same step through VARTrainer(deepspeed=config): no code from the user; the Trainer's
        # distributed sampler gives each rank one of the two groups
        policy = tiny_llama()  # before VARConfig(deepspeed=...), which makes transformers build models under zero.Init
        ds_config = {
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
        args = VARConfig(
            output_dir=os.path.join(os.path.dirname(out_path), "trainer"), report_to=[], save_strategy="no",
            disable_tqdm=True, per_device_train_batch_size=1, max_steps=1, learning_rate=LR, optim="sgd",
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, deepspeed=ds_config,
            ddp_backend="gloo", loss_backend="torch",
        )
        seen = []  # the groups of this rank's batch, recorded to build the one-process comparison

        class Recording(VARTrainer):
            def compute_loss(self, model, inputs, *a, **kw):
                seen.append(tuple(g for g in range(len(ds)) for R in inputs["rewards"]
                                  if torch.equal(R.cpu(), ds[g]["rewards"])))
                return super().compute_loss(model, inputs, *a, **kw)

        trainer = Recording(model=policy, args=args, train_dataset=ds)
        trainer.train()
        rank_groups = [None] * world_size
        dist.all_gather_object(rank_groups, seen[0])
        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            via_trainer = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        if rank == 0:
            torch.save({"engine": (params, [(0,), (1,)]), "trainer": (via_trainer, rank_groups)}, out_path)
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave(dist)


def test_deepspeed_zero3_two_ranks_equal_one_process(tmp_path):
    """ZeRO-3 (CPU accelerator, gloo): parameters after one SGD step equal one process's, both with
    compute_var_loss on a DeepSpeed engine and through VARTrainer(deepspeed=...)."""
    pytest.importorskip("deepspeed", reason="test extra: pip install deepspeed")
    ds = make_dataset()
    out_path = tmp_path / "zero3.pt"
    _run(_zero3_worker, ds, str(out_path))
    results = torch.load(out_path)
    start = {n: p.detach() for n, p in tiny_llama().named_parameters()}
    for route, (zero3, rank_groups) in results.items():
        # Through the Trainer, accelerate (1.15, CPU) reports one process under DeepSpeed, so both
        # ranks iterate the whole dataset (both take group 0); the comparison follows what each saw.
        single_g, truth_g = one_process_grads(ds, groups=[g for groups in rank_groups for g in groups])
        single = {n: start[n] - LR * single_g[n] for n in start}
        truth = {n: start[n].double() - LR * truth_g[n] for n in start}
        assert set(zero3) == set(truth), route
        for n in truth:
            assert_close(zero3[n], single[n], truth[n], name=f"ZeRO-3 ({route}): parameter {n} after one step")
        assert max(float((zero3[n] - start[n]).abs().max()) for n in start) > 1e-3  # the step moved them
        abs_d, rel_d = max_diff(zero3, single)
        print(f"ZeRO-3 ({route}, rank batches {rank_groups}): max abs / rel difference from one process "
              f"{abs_d:.2g} / {rel_d:.2g}")


# ----------------------------------------------------------------------------- scoring across ranks


def scoring_inputs(n=16):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g) for _ in range(n)]
    return prompts, responses


class CountingReward:
    """parity_reward, counting the pairs it scores in this process."""

    def __init__(self):
        self.pairs = 0

    def __call__(self, prompts, responses):
        self.pairs += len(prompts)
        return parity_reward(prompts, responses)


def _scoring_worker(rank, world_size, port, cache_dir, out_dir):
    dist = _init(rank, world_size, port)
    try:
        prompts, responses = scoring_inputs()
        reward = CountingReward()
        ds = VARDataset.build(prompts, responses, ref_model=tiny_llama(seed=7).eval(), reward=reward,
                              group_size=4, cache_dir=cache_dir, reward_fingerprint="parity")
        files = sorted(os.listdir(cache_dir))
        torch.save({"rewards": ds.rewards, "ref_logps": ds.ref_logps, "groups": ds.groups, "pairs": reward.pairs,
                    "files": files}, os.path.join(out_dir, f"rank{rank}.pt"))

        # The old advice, build inside main_process_first(): rank 1 waits in a barrier while rank 0
        # builds. Rank 0 must get an error that says what is wrong, not hang in a collective.
        import varkernels.training.data as data_mod

        data_mod.RENDEZVOUS_TIMEOUT_S = 1.0
        if rank == 0:
            try:
                VARDataset.build(prompts, responses, ref_model=tiny_llama(seed=7).eval(), reward=reward,
                                 group_size=4, reward_fingerprint="parity")
                message = "no error"
            except RuntimeError as exc:
                message = str(exc)
            with open(os.path.join(out_dir, "main_process_first.txt"), "w") as f:
                f.write(message)
            os._exit(0)  # the error ends rank 0's job (its tags no longer match rank 1's barrier)
        try:
            dist.barrier()  # rank 1 waits here, as in main_process_first, until rank 0's exit breaks it
        except RuntimeError:
            os._exit(0)
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave(dist)


def test_build_scores_a_share_per_rank_and_matches_one_process(tmp_path):
    """2 ranks: each scores 2 of the 4 groups, both end with the one-process dataset; one cache file.
    A build that only rank 0 enters (inside main_process_first) raises instead of hanging."""
    cache = tmp_path / "cache"
    cache.mkdir()
    _run(_scoring_worker, str(cache), str(tmp_path))
    prompts, responses = scoring_inputs()
    reward = CountingReward()
    single = VARDataset.build(prompts, responses, ref_model=tiny_llama(seed=7).eval(), reward=reward,
                              group_size=4)
    assert reward.pairs == 4 * 16
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["pairs"] == 2 * 16, f"rank {rank} scored {got['pairs']} pairs, expected its 2 groups × 16"
        assert got["groups"] == single.groups
        assert torch.equal(got["rewards"], single.rewards)
        # the same forwards in another process: equal up to the order-independent fp32 rounding
        torch.testing.assert_close(got["ref_logps"], single.ref_logps, atol=1e-6, rtol=1e-6)
        assert len(got["files"]) == 1 and got["files"][0].startswith("var-scores-"), got["files"]
    # the cache written by the 2-rank build is read by a one-process build: no scoring at all
    again = CountingReward()
    cached = VARDataset.build(prompts, responses, ref_model=tiny_llama(seed=7).eval(), reward=again,
                              group_size=4, cache_dir=cache, reward_fingerprint="parity")
    assert again.pairs == 0 and torch.equal(cached.ref_logps, torch.load(tmp_path / "rank0.pt")["ref_logps"])
    message = (tmp_path / "main_process_first.txt").read_text()
    assert "not every rank entered it within 1 s" in message and "main_process_first()" in message, message
    assert "Ranks 1 failed to pass monitoredBarrier" in message, message
