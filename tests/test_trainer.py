"""VARTrainer / compute_var_loss: reference parity, gradient accumulation, DDP, smoke, bad inputs."""

import os
import socket
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from tiny_trainer import V, assert_close, make_dataset, tiny_llama  # noqa: E402

from varkernels.reference import linear_var_loss_reference  # noqa: E402
from varkernels.training.data import VARCollator  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer, compute_var_loss, split_groups  # noqa: E402

# tiny models: see the one_torch_thread fixture in conftest.py
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0, data_seed=0,
    )
    return VARConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("cross_pairs", [True, False])
def test_compute_var_loss_matches_reference_per_group(cross_pairs):
    ds = make_dataset(cross_pairs=cross_pairs)
    batch = VARCollator()([ds[0], ds[1]])
    model = tiny_llama()
    out = compute_var_loss(model, batch, beta=0.5)
    out.loss.backward()
    g_fused = grads(model)

    model.zero_grad()
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    ref_losses = [
        linear_var_loss_reference(
            hidden[4 * k : 4 * k + 4], model.lm_head.weight, batch["labels"][4 * k : 4 * k + 4],
            batch["rewards"][k], batch["ref_logps"][k], beta=0.5, shift_labels=True,
        )
        for k in range(2)
    ]
    ref_loss = torch.stack(ref_losses).mean()
    ref_loss.backward()
    assert_close(out.loss, ref_loss, name="loss")
    for n, g in grads(model).items():
        assert_close(g_fused[n], g, atol=1e-6, rtol=1e-4, name=n)
    assert out.weights.shape == (8,) and out.policy_logps.shape == (8,) and out.log_z.shape == (8,)

    model.zero_grad()
    logits_out = compute_var_loss(model, batch, beta=0.5, use_fused_linear=False)
    logits_out.loss.backward()
    assert_close(logits_out.loss, out.loss, name="logits-path loss")
    for n, g in grads(model).items():
        assert_close(g, g_fused[n], atol=1e-6, rtol=1e-4, name=n)


def test_compute_var_loss_under_bf16_autocast():
    """Trainer(bf16=True) runs the loss under autocast: lm_head operands go to bf16, grads stay fp32."""
    ds = make_dataset()
    batch = VARCollator()([ds[0], ds[1]])
    model = tiny_llama()
    ref = compute_var_loss(model, batch)
    ref.loss.backward()
    g32 = model.lm_head.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compute_var_loss(model, batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2 * abs(ref.loss.item())
    assert (model.lm_head.weight.grad - g32).abs().max() < 2e-2 * g32.abs().max()


def test_k_groups_in_one_batch_equal_the_mean_of_single_groups():
    ds = make_dataset()
    model = tiny_llama()
    both = compute_var_loss(model, VARCollator()([ds[0], ds[1]]))
    both.loss.backward()
    g_both = grads(model)
    model.zero_grad()
    singles = [compute_var_loss(model, VARCollator()([ds[k]])) for k in range(2)]
    (sum(s.loss for s in singles) / 2).backward()
    assert_close(both.loss, (singles[0].loss + singles[1].loss) / 2, name="loss")
    for n, g in grads(model).items():
        assert_close(g_both[n], g, name=n)


def sgd_step_with_trainer(tmp_path, ds, batch_size, accumulation):
    model = tiny_llama()
    args = config(
        tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, max_steps=1,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0,
    )
    VARTrainer(model=model, args=args, train_dataset=ds).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_whole_batch(tmp_path):
    """Two groups as one batch == two accumulation steps of one group == SGD on the mean loss."""
    ds = make_dataset()
    whole = sgd_step_with_trainer(tmp_path, ds, batch_size=2, accumulation=1)
    accumulated = sgd_step_with_trainer(tmp_path, ds, batch_size=1, accumulation=2)
    model = tiny_llama()
    compute_var_loss(model, VARCollator()([ds[0], ds[1]])).loss.backward()
    manual = {n: (p - 0.5 * p.grad).detach() for n, p in model.named_parameters()}
    moved = 0.0
    for n in manual:
        assert_close(accumulated[n], whole[n], name=n)
        assert_close(whole[n], manual[n], name=n)
        moved = max(moved, (manual[n] - dict(model.named_parameters())[n]).abs().max().item())
    assert moved > 1e-4  # the step did change the weights


# ----------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, ds, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = tiny_llama()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        # each rank: its own group, its own Ẑ. backend="torch": the test is about DDP, and it
        # keeps the workers from building the C++ kernel.
        out = compute_var_loss(ddp, VARCollator()([ds[rank]]), backend="torch")
        out.loss.backward()
        if rank == 0:
            torch.save(grads(model), out_path)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without running destructors: tearing down DDP's reducer and the gloo process group at
    # interpreter exit can deadlock (the group's destructor joins its worker thread while holding
    # the GIL that thread needs; seen here once in ~10 runs). The results are on disk already.
    os._exit(0)


def test_ddp_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    ds = make_dataset()
    out_path = str(tmp_path / "ddp_grads.pt")
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), ds, out_path), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a hung worker fails the test instead of hanging CI
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    ddp_grads = torch.load(out_path)
    model = tiny_llama()
    compute_var_loss(model, VARCollator()([ds[0], ds[1]]), backend="torch").loss.backward()
    single = grads(model)
    assert set(ddp_grads) == set(single)
    for n, g in single.items():
        assert_close(ddp_grads[n], g, name=n)


# ----------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("cross_pairs", [True, False])
def test_trainer_smoke_logs_var_metrics(tmp_path, cross_pairs):
    ds = make_dataset(n=12, group_size=4, cross_pairs=cross_pairs)
    args = config(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, num_train_epochs=2,
                  learning_rate=1e-3, eval_strategy="epoch", per_device_eval_batch_size=2)
    trainer = VARTrainer(model=tiny_llama(), args=args, train_dataset=ds, eval_dataset=ds)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == trainer.state.global_step == 4 and len(eval_logs) == 2
    for key in ("weights_mean", "weights_min", "weights_max", "ess", "log_z", "policy_logps", "ref_logps"):
        assert f"var/{key}" in train_logs[-1] and f"eval_var/{key}" in eval_logs[-1]
    log = train_logs[-1]
    assert 0 < log["var/weights_min"] <= log["var/weights_mean"] <= log["var/weights_max"] <= 4
    assert 1 <= log["var/ess"] <= 4


def test_config_and_trainer_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"beta must be a finite number > 0, got 0\.0"):
        config(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="weighting must be one of"):
        config(tmp_path, weighting="uniform")
    with pytest.raises(ValueError, match="logp_reduction must be one of"):
        config(tmp_path, logp_reduction="none")
    with pytest.raises(ValueError, match="remove_unused_columns must be False"):
        config(tmp_path, remove_unused_columns=True)
    ds = make_dataset()
    with pytest.raises(ValueError, match="scored with reduction='mean' but args.logp_reduction='sum'"):
        VARTrainer(model=tiny_llama(), args=config(tmp_path, logp_reduction="sum"), train_dataset=ds)
    with pytest.raises(TypeError, match="args must be a varkernels.training.VARConfig"):
        VARTrainer(model=tiny_llama(), args=transformers.TrainingArguments(output_dir=str(tmp_path)),
                   train_dataset=ds)
    batch = VARCollator()([ds[0]])
    with pytest.raises(ValueError, match="batch is missing 'rewards'"):
        compute_var_loss(tiny_llama(), {k: v for k, v in batch.items() if k != "rewards"})
    with pytest.raises(ValueError, match=r"rewards must have shape \(B, B\) = \(4, 4\) .*\(k, B, B\) / \(k, B\) with "
                       r"k\*B = 4 .*got \(1, 3, 3\).*input_ids\.shape\[0\] = 4"):
        compute_var_loss(tiny_llama(), {**batch, "rewards": batch["rewards"][:, :3, :3],
                                        "ref_logps": batch["ref_logps"][:, :3, :3]})


def test_config_options_use_the_loss_checks(tmp_path):
    """VARConfig checks its options with the loss's own rules (varkernels._validation)."""
    with pytest.raises(TypeError, match=r"beta must be a Python number > 0, got str '0\.5'"):
        config(tmp_path, beta="0.5")
    for bad in (float("inf"), float("nan"), -1):
        with pytest.raises(ValueError, match=rf"beta must be a finite number > 0, got {bad!r}"):
            config(tmp_path, beta=bad)
    with pytest.raises(ValueError, match=r"loss_backend must be one of \['auto', 'triton', 'cpu', 'torch'\], got 'gp"):
        config(tmp_path, loss_backend="gpu")
    for name in ("max_length", "max_prompt_length", "max_completion_length", "scoring_batch_size",
                 "loss_chunk_size"):
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match=rf"{name} must be a positive int or None, got {bad!r}"):
                config(tmp_path, **{name: bad})
    assert config(tmp_path, beta=2, max_length=None).beta == 2
    batch = VARCollator()([make_dataset()[0]])
    with pytest.raises(ValueError, match=r"rewards and ref_logps must have the same shape.*\(1, 4, 4\).*\(1, 4\)"):
        compute_var_loss(tiny_llama(), {**batch, "ref_logps": batch["ref_logps"][:, 0]})
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor, got list"):
        compute_var_loss(tiny_llama(), {**batch, "rewards": batch["rewards"].tolist()})
    assert split_groups(batch) == (1, 4, True)
    assert split_groups({**batch, "rewards": batch["rewards"][0], "ref_logps": batch["ref_logps"][0]}) == (1, 4, True)


# peft 0.21's get_peft_model calls transformers 5.24's deprecated is_gradient_checkpointing
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_policy_trains(tmp_path):
    peft = pytest.importorskip("peft", reason="optional extra: pip install peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ds = make_dataset()
    trainer = VARTrainer(model=model, args=config(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=ds)
    trainer.train()
    assert "var/ess" in trainer.state.log_history[0]


# ----------------------------------------------------------------------------- compile, mixed precision


class HeadRecorder:
    """Wraps varkernels.fused_linear_var_loss (what compute_var_loss calls) and watches lm_head's
    outputs: records the hidden states' shape and the dtype the fused head's GEMMs run in for these operands
    (``head_dtype``: the autocast dtype under autocast) twice, for hidden and weight, and the last dim of every
    lm_head output."""

    def __init__(self, monkeypatch, model):
        import varkernels

        self.calls, self.head_outputs = [], []
        original = varkernels.fused_linear_var_loss

        from varkernels.core.autograd import head_dtype

        def recording(hidden, weight, *args, **kwargs):
            gemm = head_dtype(hidden, weight)
            self.calls.append((tuple(hidden.shape), gemm, gemm))
            return original(hidden, weight, *args, **kwargs)

        monkeypatch.setattr(varkernels, "fused_linear_var_loss", recording)
        model.lm_head.register_forward_hook(lambda mod, args, out: self.head_outputs.append(tuple(out.shape)))


def sgd_args(tmp_path, **kw):
    return config(tmp_path, per_device_train_batch_size=2, max_steps=2, learning_rate=0.5, optim="sgd",
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, **kw)


def test_torch_compile_keeps_the_fused_path_and_matches_eager(tmp_path, monkeypatch):
    """torch_compile=True (aot_eager: Inductor would compile C++ for minutes on CPU): the model
    reaches compute_loss as an OptimizedModule, the loss still runs on hidden states inside lm_head
    (no [N, T, V] logits: lm_head's output is the [N, 1, 1] stand-in), and 2 SGD steps equal eager."""
    import torch._dynamo

    ds = make_dataset()
    params = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_llama()
        rec = HeadRecorder(monkeypatch, model)
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = VARTrainer(model=model, args=sgd_args(tmp_path, **extra), train_dataset=ds)
        seen = []
        monkeypatch.setattr(trainer, "compute_loss", _spy(trainer.compute_loss, seen))
        trainer.train()
        assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) == compiled for m in seen), seen
        assert len(rec.calls) == 2  # 2 steps, each one call for its 2 groups
        T = ds[0]["input_ids"].shape[1]
        assert all(shape[1] >= T and shape[2] == 32 for shape, _, _ in rec.calls)  # hidden states, H = 32
        assert rec.head_outputs and all(out[-1] != V for out in rec.head_outputs), rec.head_outputs
        params[compiled] = {n: p.detach().clone() for n, p in model.named_parameters()}
        monkeypatch.undo()
    for n, p in params[False].items():
        assert_close(params[True][n], p, name=n)
    torch._dynamo.reset()


def _spy(fn, seen):
    def wrapper(model, inputs, *args, **kwargs):
        seen.append(model)
        return fn(model, inputs, *args, **kwargs)

    return wrapper


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_head_runs_in_that_dtype(tmp_path, monkeypatch, precision):
    """bf16=True / fp16=True: accelerate wraps the model's forward in autocast, and the loss runs
    inside lm_head's forward, so the fused head runs its GEMMs in the autocast dtype; the fp32 master
    weights get fp32 gradients (from the fp32 accumulator) and move. On CPU accelerate autocasts only
    bf16 (fp16=True trains in fp32 there), so fp16 is checked the way accelerate applies it on a
    GPU: ``model.forward = autocast(model.forward)``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    ds = make_dataset()
    model = tiny_llama()
    before = model.lm_head.weight.detach().clone()
    rec = HeadRecorder(monkeypatch, model)
    grad_dtypes = []
    model.lm_head.weight.register_hook(lambda g: grad_dtypes.append(g.dtype))
    if precision == "bf16":
        VARTrainer(model=model, args=sgd_args(tmp_path, bf16=True), train_dataset=ds).train()
    else:
        model.forward = torch.autocast("cpu", dtype=torch.float16)(model.forward)  # as accelerate does on GPU
        compute_var_loss(model, VARCollator()([ds[0], ds[1]])).loss.backward()
        with torch.no_grad():
            model.lm_head.weight -= 0.5 * model.lm_head.weight.grad
    assert rec.calls and all(h == dtype and w == dtype for _, h, w in rec.calls), rec.calls
    assert model.lm_head.weight.dtype == torch.float32 and grad_dtypes and set(grad_dtypes) == {torch.float32}
    assert (model.lm_head.weight - before).abs().max() > 1e-4


def test_fp16_flag_on_cpu_trains_in_fp32(tmp_path, monkeypatch):
    """What docs/trainer.md says about fp16=True on CPU: accelerate applies no autocast there."""
    model = tiny_llama()
    rec = HeadRecorder(monkeypatch, model)
    VARTrainer(model=model, args=sgd_args(tmp_path, fp16=True), train_dataset=make_dataset()).train()
    assert rec.calls and all(h == torch.float32 and w == torch.float32 for _, h, w in rec.calls), rec.calls


def test_unwrap_model_reaches_the_causal_lm_through_compile_and_peft():
    """accelerate's extract_model_from_parallel (compile, DDP, DeepSpeed) plus PEFT's get_base_model."""
    from varkernels.training.lm_head import unwrap_model

    model = tiny_llama()
    assert unwrap_model(torch.compile(model)) is model
    peft = pytest.importorskip("peft", reason="optional extra: pip install peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert unwrap_model(torch.compile(lora)) is model and unwrap_model(lora) is model
