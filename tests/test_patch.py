"""``varkernels.patch_causal_lm`` (varkernels/patch.py): a Hugging Face causal LM computing its loss in lm_head.

Tiny Llama, Qwen2, Mistral and Gemma-2 (``final_logit_softcapping``, tied embeddings) models, random init,
fp32, the lm_head weight scaled up so that the logits span confident and flat tokens (and the softcap
bends them). Compared under the tolerance policy of tests/helpers.py (docs/design.md §4.1):
max |patched − truth| ≤ 2·max |unpatched fp32 − truth| + 1e-6·max |truth|, where ``truth`` is the same
computation on a float64 copy of the model. The decoder runs the same ops patched or not; what differs is
the head + loss (fused chunks vs [B, T, V] logits and cross_entropy), i.e. fp32 summation order, which the
"twice PyTorch's own fp32 error" bound is built for.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_close

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="the train extra: LMHead unwraps models with accelerate")

import varkernels  # noqa: E402
from varkernels import fused_linear_var_loss, patch_causal_lm, unpatch_causal_lm, var_weights  # noqa: E402
from varkernels.patch import is_patched  # noqa: E402
from varkernels.reference import linear_weighted_nll_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, B, T = 64, 3, 10
SOFTCAP = 4.0
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY, head_dim=8),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                                                final_logit_softcapping=SOFTCAP),
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    cfg._attn_implementation = "eager"
    model = getattr(transformers, {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM"}[arch])(cfg)
    with torch.no_grad():  # logits of a few units: confident targets and flat ones, the softcap matters
        model.get_output_embeddings().weight.mul_(40.0 if arch != "gemma2" else 4.0)
    return model


def batch(seed: int = 1, rows: int = B) -> dict:
    """input_ids / attention_mask / labels [rows, T]: a prompt (-100), the response, right padding (-100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, T), generator=g)
    mask = torch.ones(rows, T, dtype=torch.long)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[0, :5] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run(model, **kwargs):
    """(output, {name: grad}) of one forward + backward of ``model(**kwargs).loss``."""
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out, grads(model)


def assert_all_close(actual: dict, ref: dict, truth: dict, what: str):
    assert set(actual) == set(truth) == set(ref), (sorted(actual), sorted(truth))
    for n in truth:
        assert_close(actual[n], ref[n], truth[n], name=f"{what}: grad of {n}")


def three(model):
    """(patched copy, unpatched fp32 copy, unpatched float64 copy) of ``model``."""
    return patch_causal_lm(copy.deepcopy(model)), copy.deepcopy(model), copy.deepcopy(model).double()


# ----------------------------------------------------------------------------- the model's own loss


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_loss_and_gradients_equal_the_models_own(arch):
    patched, ref, truth = three(build(arch))
    data = batch()
    out, g = run(patched, **data)
    ref_out, g_ref = run(ref, **data)
    truth_out, g_truth = run(truth, **data)
    assert out.logits is None and ref_out.logits is not None
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close(out.loss, ref_out.loss, truth_out.loss, name=f"{arch}: loss")
    assert_all_close(g, g_ref, g_truth, arch)
    # the other fields of the output are the model's (the KV cache here)
    assert (out.past_key_values is not None) == (ref_out.past_key_values is not None)


@pytest.mark.parametrize("num_items", ["tensor", "int"])
def test_num_items_in_batch(num_items):
    """Trainer under gradient accumulation passes num_items_in_batch: token sum / num_items_in_batch."""
    patched, ref, truth = three(build("llama"))
    data = batch()
    n = 23 if num_items == "int" else torch.tensor(23)
    out, g = run(patched, **data, num_items_in_batch=n)
    ref_out, g_ref = run(ref, **data, num_items_in_batch=n)
    truth_out, g_truth = run(truth, **data, num_items_in_batch=n)
    assert_close(out.loss, ref_out.loss, truth_out.loss, name="loss with num_items_in_batch")
    assert_all_close(g, g_ref, g_truth, "num_items_in_batch")
    mean = patched(**data).loss
    n_tokens = int((data["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss.detach(), mean.detach() * n_tokens / 23)


def test_positional_arguments_and_return_dict_false():
    patched, ref = patch_causal_lm(build("qwen2")), build("qwen2")
    data = batch()
    expected = ref(**data).loss
    got = patched(data["input_ids"], data["attention_mask"], labels=data["labels"])
    torch.testing.assert_close(got.loss, expected)
    as_tuple = patched(**data, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected)
    assert not any(isinstance(t, torch.Tensor) and t.shape[-1:] == (V,) for t in as_tuple[1:])  # no logits


# ----------------------------------------------------------------------------- loss_weights


@pytest.mark.parametrize("form", ["sequence", "token"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_loss_weights_equal_the_reference_on_hidden_states(arch, form):
    """loss_weights [B] or [B, T]: linear_weighted_nll_reference(hidden, W, labels, w, reduction="mean",
    shift_labels=True, softcap) on the decoder's hidden states, i.e. the full-logits weighted NLL."""
    model = build(arch)
    patched, ref, truth = three(model)
    data = batch()
    g = torch.Generator().manual_seed(2)
    w = torch.rand((B,) if form == "sequence" else (B, T), generator=g) * 2.5 - 0.5  # signed, like advantages
    softcap = SOFTCAP if arch == "gemma2" else None
    out, g_patched = run(patched, **data, loss_weights=w)
    assert out.logits is None

    def reference(m, dtype):
        m.zero_grad(set_to_none=True)
        hidden = m.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
        loss = linear_weighted_nll_reference(hidden, m.lm_head.weight, data["labels"], w.to(dtype),
                                             reduction="mean", shift_labels=True, softcap=softcap)
        loss.backward()
        return loss, grads(m)

    ref_loss, g_ref = reference(ref, torch.float32)
    truth_loss, g_truth = reference(truth, torch.float64)
    assert_close(out.loss, ref_loss, truth_loss, name=f"{arch} {form}: weighted loss")
    assert_all_close(g_patched, g_ref, g_truth, f"{arch} {form} weights")


@pytest.mark.parametrize("cross", [True, False], ids=["cross-pair", "shared-context"])
def test_var_weights_through_the_patched_model_is_fused_linear_var_loss(cross):
    """loss_weights=var_weights(R, Q) is the VAR loss (fused_linear_var_loss on the same hidden states)."""
    model = build("llama")
    patched, plain = three(model)[:2]
    data = batch()
    g = torch.Generator().manual_seed(3)
    shape = (B, B) if cross else (B,)
    R, Q = torch.randn(shape, generator=g), -torch.rand(shape, generator=g)
    loss = patched(**data, loss_weights=var_weights(R, Q, beta=0.5)).loss
    hidden = plain.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
    expected = fused_linear_var_loss(hidden, plain.lm_head.weight, data["labels"], R, Q, beta=0.5, shift_labels=True)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_loss_weights_without_labels_is_an_error():
    patched = patch_causal_lm(build("llama"))
    with pytest.raises(ValueError, match="loss_weights needs labels"):
        patched(input_ids=batch()["input_ids"], loss_weights=torch.ones(B))


# ----------------------------------------------------------------------------- patch / unpatch


def test_without_labels_the_model_is_unchanged():
    model = build("gemma2")
    ref = copy.deepcopy(model)
    patch_causal_lm(model)
    data = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**data).logits, ref(**data).logits)
        assert torch.equal(model(data["input_ids"]).logits, ref(data["input_ids"]).logits)


def test_patch_is_idempotent_and_unpatch_restores():
    model = build("llama")
    ref = copy.deepcopy(model)
    data = batch()
    assert patch_causal_lm(model) is model and is_patched(model)
    forward = model.forward
    first = model(**data).loss
    patch_causal_lm(model, chunk_size=8)  # patching again: the options only, no second wrapper
    assert model.forward.__func__ is forward.__func__
    torch.testing.assert_close(model(**data).loss, first)
    assert "loss_weights" in __import__("inspect").signature(model.forward).parameters  # Trainer keeps the column
    assert unpatch_causal_lm(model) is model and not is_patched(model)
    assert "forward" not in model.__dict__
    unpatch_causal_lm(model)  # a no-op
    out, expected = model(**data), ref(**data)
    assert out.logits is not None and torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)


def test_deepcopy_of_a_patched_model_runs_the_copy():
    model = patch_causal_lm(build("llama"))
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    with torch.no_grad():
        clone.model.norm.weight.mul_(2.0)
    data = batch()
    assert not torch.equal(clone(**data).loss, model(**data).loss)


def test_import_varkernels_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, varkernels; varkernels.var_weights; print('transformers' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, check=True)
    assert out.stdout.strip() == "False"
    assert {"patch_causal_lm", "unpatch_causal_lm", "var_weights"} <= set(varkernels.__all__)


# ----------------------------------------------------------------------------- PEFT, fallback, compile


def test_peft_lora_on_attention():
    peft = pytest.importorskip("peft", reason="optional extra: pip install peft")
    torch.manual_seed(5)
    lora = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    patched, ref, truth = three(lora)
    data = batch()
    out, g = run(patched, **data)
    ref_out, g_ref = run(ref, **data)
    truth_out, g_truth = run(truth, **data)
    assert out.logits is None
    assert g and all("lora_" in n for n in g)
    assert_close(out.loss, ref_out.loss, truth_out.loss, name="PEFT loss")
    assert_all_close(g, g_ref, g_truth, "PEFT")
    w = torch.rand(B)
    assert torch.isfinite(patched(**data, loss_weights=w).loss)


def test_lora_on_lm_head_falls_back_to_the_models_loss():
    """Where the fused path does not apply: strict=True raises at patch time, else one warning and the
    model's own loss (loss_weights: weighted_nll on its logits), logits returned."""
    peft = pytest.importorskip("peft", reason="optional extra: pip install peft")
    lora = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        patch_causal_lm(lora, strict=True)
    assert not is_patched(lora)
    ref = copy.deepcopy(lora)
    patch_causal_lm(lora)
    data = batch()
    with pytest.warns(UserWarning, match="computes its logits and its own loss"):
        out = lora(**data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per model
        again = lora(**data)
        weighted = lora(**data, loss_weights=torch.ones(B))
    expected = ref(**data)
    assert out.logits is not None and torch.equal(out.loss, expected.loss) and torch.equal(again.loss, out.loss)
    ones = varkernels.weighted_nll(expected.logits, data["labels"], torch.ones(B), shift_labels=True)
    torch.testing.assert_close(weighted.loss, ones)
    assert weighted.logits is not None


def test_torch_compile_of_a_patched_model_gives_the_same_loss():
    """aot_eager (Inductor would compile C++ for minutes on CPU); the loss runs eagerly in the head."""
    patched, plain = patch_causal_lm(build("llama")), build("llama")
    compiled = torch.compile(patched, backend="aot_eager")
    data = batch()
    out = compiled(**data)
    assert out.logits is None
    expected = plain(**data).loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)  # fp32 summation order only
    out.loss.backward()
    plain.zero_grad()
    expected.backward()
    for (n, p), q in zip(patched.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    no_labels = compiled(input_ids=data["input_ids"])
    assert no_labels.logits.shape == (B, T, V)


# ----------------------------------------------------------------------------- docs/trainer.md


def own_loop_block() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "trainer.md").read_text(encoding="utf-8")
    section = next(s for s in re.split(r"^## ", text, flags=re.M) if s.startswith("Using the fused loss in your own"))
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def test_trainer_md_own_loop_runs():
    """docs/trainer.md "Using the fused loss in your own loop" runs as printed."""
    namespace = {"__name__": "trainer_md_own_loop"}
    exec(compile(own_loop_block(), "docs/trainer.md own loop", "exec"), namespace)
    assert namespace["out"].logits is None and torch.isfinite(namespace["out"].loss)
    assert is_patched(namespace["policy"])


# ----------------------------------------------------------------------------- FSDP2 (2 processes, gloo)

FSDP_ROWS = 4  # 2 rows per rank


def _fsdp2_worker(rank, world_size, port, data, weights, out_dir):
    from _distributed import _init, _leave

    dist = _init(rank, world_size, port)
    try:
        from torch.distributed.fsdp import fully_shard

        rows = slice(2 * rank, 2 * rank + 2)
        mine = {k: v[rows] for k, v in data.items()}
        n_total = int((data["labels"][:, 1:] != -100).sum())
        # FSDP averages the ranks' gradients: loss_weights (a mean over rows) and the token sum divided by
        # num_items_in_batch = n_total / world_size (Trainer's convention) give the global batch's loss
        cases = {"weights": {"loss_weights": weights[rows]},
                 "num_items": {"num_items_in_batch": torch.tensor(n_total / world_size)}}
        for name, extra in cases.items():
            model = patch_causal_lm(build("llama"), backend="torch")
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            out = model(**mine, **extra)
            assert out.logits is None
            out.loss.backward()
            full = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            if rank == 0:
                torch.save(full, f"{out_dir}/{name}.pt")
    except BaseException:
        dist.destroy_process_group()
        raise
    _leave(dist)


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    """fully_shard on the layers and the root of a patched model: the loss runs in lm_head on the gathered
    weight (outside the forward it is a shard); gradients equal one process on the whole batch."""
    from _distributed import _run

    data = batch(rows=FSDP_ROWS)
    w = torch.rand(FSDP_ROWS, generator=torch.Generator().manual_seed(4)) + 0.5
    _run(_fsdp2_worker, data, w, str(tmp_path))
    for name, extra in {"weights": {"loss_weights": w}, "num_items": {}}.items():
        fsdp = torch.load(tmp_path / f"{name}.pt")
        _, single = run(patch_causal_lm(build("llama")), **data, **extra)
        truth = build("llama").double()
        if name == "weights":
            truth.zero_grad(set_to_none=True)
            hidden = truth.model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
            linear_weighted_nll_reference(hidden, truth.lm_head.weight, data["labels"], w.double(),
                                          shift_labels=True).backward()
            g_truth = grads(truth)
        else:
            _, g_truth = run(truth, **data)
        assert_all_close(fsdp, single, g_truth, f"FSDP2 {name}")


def test_trainer_with_gradient_accumulation_equals_the_unpatched_model(tmp_path):
    """transformers.Trainer passes num_items_in_batch (the forward takes **kwargs) and does not divide by
    the accumulation steps: one SGD step over 2 accumulated micro-batches equals the unpatched model's."""
    data = batch(rows=4)
    rows = [{k: v[i] for k, v in data.items()} for i in range(4)]
    params = {}
    for patched in (False, True):
        model = build("llama")
        if patched:
            patch_causal_lm(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=0.0, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
            dataloader_drop_last=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        params[patched] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in params[False].items():
        torch.testing.assert_close(params[True][n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")



def test_trainer_with_gradient_accumulation_scales_loss_weights_by_token_share(tmp_path):
    """With loss_weights, Trainer passes num_items_in_batch and so neither divides by the accumulation steps:
    each micro-batch's weighted mean counts by its share of the accumulated target tokens. One SGD step over
    2 accumulated micro-batches equals the step on Σ_m (n_m / n)·mean_m (n_m: 9 and 14 target tokens here),
    and the whole batch's step when the micro-batches hold as many tokens each."""
    w = torch.tensor([0.5, 1.5, 2.0, 1.0])
    halves = (slice(0, 2), slice(2, 4))

    def one_step(data, accumulation):
        rows = [{**{k: v[i] for k, v in data.items()}, "loss_weights": w[i]} for i in range(4)]
        model = patch_causal_lm(build("llama"))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(accumulation)), per_device_train_batch_size=4 // accumulation,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.5, optim="sgd",
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
            disable_tqdm=True, use_cpu=True, dataloader_drop_last=True, remove_unused_columns=False,
        )
        transformers.Trainer(model=model, args=args, train_dataset=rows).train()
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def replay(data):
        model = build("llama")
        n = [int((data["labels"][m, 1:] != -100).sum()) for m in halves]
        loss = 0.0
        for n_m, m in zip(n, halves):
            hidden = model.model(input_ids=data["input_ids"][m], attention_mask=data["attention_mask"][m])
            loss = loss + n_m / sum(n) * varkernels.linear_weighted_nll(
                hidden.last_hidden_state, model.lm_head.weight, data["labels"][m], w[m], shift_labels=True)
        loss.backward()
        with torch.no_grad():
            return {k: p - 0.5 * p.grad if p.grad is not None else p.clone() for k, p in model.named_parameters()}

    def check(got, expected, name):
        for n, p in expected.items():
            torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{name} {n}: {m}")

    uneven = batch(rows=4)
    even = {"input_ids": uneven["input_ids"], "attention_mask": torch.ones_like(uneven["attention_mask"])}
    even["labels"] = even["input_ids"].masked_fill(torch.arange(T) < 3, -100)  # 6 target tokens a row
    check(one_step(uneven, 2), replay(uneven), "uneven")
    accumulated = one_step(even, 2)
    check(accumulated, replay(even), "even")
    check(accumulated, one_step(even, 1), "even, one micro-batch")
