"""OnlineVARTrainer where GRPOTrainer's own options used to be dropped, refused or ignored (issue 28):

- MoE: the router load-balancing loss is added as GRPO adds it (router_aux_loss_coef · aux_loss, divided by the
  gradient-accumulation steps), against GRPO's own computation of the term, and logged as ``aux_loss``
  (tiny Qwen3-MoE and GPT-OSS);
- ``cast_lm_head_to_fp32=True``: the in-head loss gets float32 hidden states and weight outside autocast, and
  its loss and head gradient match a float32 reference (float64 truth) under bf16 autocast;
- ``reward_funcs=None`` with an ``environment_factory`` whose environment owns the reward (``get_reward``):
  the weights are formed from the environment's rewards;
- ``sync_ref_model=True`` with ``var_reference="initial"``: VAR's reference is mixed toward the policy as TRL
  mixes its own; refused with "policy" and under PEFT;
- ``top_entropy_quantile < 1``: only GRPO's high-entropy tokens carry weight (loss and gradient against full
  logits in plain PyTorch); ``entropy_coef`` / ``use_adaptive_entropy`` are refused with the reason.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
datasets = pytest.importorskip("datasets")

import tiny_text  # noqa: E402
from helpers import assert_close  # noqa: E402

from varkernels.training import online  # noqa: E402
from varkernels.training.online import OnlineVARConfig, OnlineVARTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
G = 4


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                max_completion_length=6, max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, var_beta=0.5, seed=0,
                var_reference="policy")
    return OnlineVARConfig(**{**base, **kw})


def prompts(n=16):
    return datasets.Dataset.from_list([{"prompt": r["prompt"], "topic": r["topic"]} for r in tiny_text.rows(n)])


def trainer_with_batches(model, args, **kw):
    """OnlineVARTrainer on the tiny tokenizer, recording each generation batch it builds (with var_weights)."""
    if "environment_factory" not in kw:
        kw["reward_funcs"] = tiny_text.count_topic
    trainer = OnlineVARTrainer(model=model, args=args, train_dataset=kw.pop("train_dataset", prompts()),
                               processing_class=kw.pop("processing_class", tiny_text.tokenizer()), **kw)
    batches, inner = [], trainer._generate_and_score_completions

    def generate_and_score(inputs):
        out = inner(inputs)
        batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
        return out

    trainer._generate_and_score_completions = generate_and_score
    return trainer, batches


def loss_and_grads(trainer, batch, ga=1):
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = ga
    model.zero_grad(set_to_none=True)
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- MoE auxiliary loss


def tiny_moe(kind):
    common = dict(vocab_size=len(tiny_text.WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  num_experts_per_tok=2, router_aux_loss_coef=0.3)  # output_router_logits: False
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, **common)
    else:
        cfg = transformers.GptOssConfig(intermediate_size=16, num_local_experts=4, head_dim=8, sliding_window=16,
                                        **common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_moe_router_loss_is_added_and_logged_as_grpo_does(tmp_path, kind):
    """loss = VAR loss + coef·aux, both over the accumulation steps, with aux from GRPO's own fused head
    (``_get_per_token_logps_and_entropies(compute_aux_loss=True)``); the gradient carries coef·∇aux / GA."""
    trainer, batches = trainer_with_batches(tiny_moe(kind), config(tmp_path))
    trainer.train()
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.3
    assert "aux_loss" in trainer.state.log_history[0]
    batch, model = batches[0], trainer.model
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    model.train()
    model.zero_grad(set_to_none=True)
    aux = trainer._get_per_token_logps_and_entropies(model, ids, att, batch["completion_ids"].size(1),
                                                     compute_aux_loss=True)[2]
    aux.backward()
    aux_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("router" in n or "gate" in n for n in aux_grads)

    loss, grads = loss_and_grads(trainer, batch, ga=2)
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(float(aux.detach()), rel=1e-6)
    trainer.aux_loss_enabled = False
    loss0, grads0 = loss_and_grads(trainer, batch, ga=2)
    torch.testing.assert_close(loss - loss0, 0.3 * aux.detach() / 2, rtol=1e-5, atol=1e-6)
    for n, g in aux_grads.items():
        torch.testing.assert_close(grads[n], grads0.get(n, 0 * g) + 0.3 * g / 2, rtol=1e-4,
                                   atol=1e-6 * float(grads[n].abs().max()), msg=n)


# ----------------------------------------------------------------------------- cast_lm_head_to_fp32


def test_cast_lm_head_to_fp32_runs_the_in_head_loss_in_float32(tmp_path, monkeypatch):
    """A bf16 model under bf16 autocast (GRPO's head cast to fp32): the fused-linear loss sees fp32 hidden states
    and weight with autocast off, and its loss and head gradient equal an fp32 computation (float64 truth)."""
    model = tiny_text.llama().to(torch.bfloat16)
    trainer, batches = trainer_with_batches(model, config(tmp_path, bf16=True, cast_lm_head_to_fp32=True))
    trainer.train()
    head = trainer.model.get_output_embeddings()
    assert head.weight.dtype == torch.float32  # GRPO's cast
    seen, hidden = [], []
    inner = online.linear_weighted_nll

    def spy(h, w, *args, **kw):
        seen.append((h.dtype, w.dtype, torch.is_autocast_enabled(h.device.type)))
        return inner(h, w, *args, **kw)

    monkeypatch.setattr(online, "linear_weighted_nll", spy)
    handle = head.register_forward_pre_hook(lambda module, args: hidden.append(args[0].detach()))
    batch = batches[0]
    try:
        loss, grads = loss_and_grads(trainer, batch)
    finally:
        handle.remove()
    assert seen == [(torch.float32, torch.float32, False)]
    assert hidden[0].dtype == torch.bfloat16

    def plain(dtype):
        W = head.weight.detach().to(dtype).requires_grad_()
        logits = hidden[0].to(dtype)[:, :-1] @ W.t()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        cm = batch["completion_mask"].to(dtype)
        s = (lp[:, batch["prompt_ids"].shape[1] - 1:] * cm).sum(1) / cm.sum(1).clamp(min=1)
        value = -(batch["var_weights"].to(dtype) * s).mean()
        value.backward()
        return value.detach(), W.grad

    (v32, g32), (v64, g64) = plain(torch.float32), plain(torch.float64)
    assert_close(loss, v32, v64, name="loss")
    assert_close(grads["lm_head.weight"], g32, g64, name="lm_head.weight grad")


# ----------------------------------------------------------------------------- environment-owned reward


def test_environment_owned_reward_without_reward_funcs(tmp_path, monkeypatch):
    """TRL 1.16's contract: reward_funcs left out (None), an environment's get_reward is the reward source
    (weight 1); the weights are the softmax of exactly the rewards the environments returned."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    returned = []

    class Env:
        def reset(self, **kwargs):
            self.r = float(torch.rand(()))

        def get_reward(self):
            returned.append(self.r)
            return self.r

    tok = tiny_text.tokenizer()
    tok.chat_template = (  # renders tool calls and tool messages: TRL checks that for environments
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% for c in m.get('tool_calls') or [] %}"
        "{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }} {% endfor %}"
        "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}{% if add_generation_prompt %}assistant: "
        "{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in tiny_text.rows(16)]
    trainer, batches = trainer_with_batches(tiny_text.llama(), config(tmp_path), environment_factory=Env,
                                            processing_class=tok,
                                            train_dataset=datasets.Dataset.from_list(rows))
    assert trainer.reward_func_names == ["Env"]
    trainer.train()
    r = torch.tensor(returned, dtype=torch.float64).view(-1, G)
    assert len(returned) == 2 * G and r.std() > 0
    want = G * torch.softmax(r / 0.5, dim=1).reshape(-1)
    torch.testing.assert_close(batches[0]["var_weights"].double(), want, rtol=1e-6, atol=1e-7)


def test_no_reward_source_is_trls_error(tmp_path):
    with pytest.raises(ValueError, match="No reward source provided"):
        OnlineVARTrainer(model=tiny_text.llama(), args=config(tmp_path), train_dataset=prompts(),
                         processing_class=tiny_text.tokenizer())


# ----------------------------------------------------------------------------- sync_ref_model


def test_sync_ref_model_mixes_vars_reference_toward_the_policy(tmp_path):
    """After each step (ref_model_sync_steps=1), π_ref ← α·π_θ + (1 − α)·π_ref: TRL's callback on VAR's reference."""
    args = config(tmp_path, var_reference="initial", sync_ref_model=True, ref_model_sync_steps=1,
                  ref_model_mixup_alpha=0.25, learning_rate=0.05)
    trainer, _ = trainer_with_batches(tiny_text.llama(), args)
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    moved = 0
    for n, p in trainer.ref_model.named_parameters():
        want = 0.75 * before[n] + 0.25 * policy[n].detach()
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7, msg=n)
        moved += not torch.equal(p, before[n])
    assert moved > 0 and args.sync_ref_model  # the option is left as given


def test_sync_ref_model_is_refused_without_a_reference_model(tmp_path):
    with pytest.raises(ValueError, match="sync_ref_model=True syncs the reference model of var_reference='initial'"
                                         ", got var_reference='policy'"):
        config(tmp_path, sync_ref_model=True)
    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="sync_ref_model=True needs a reference model; under PEFT"):
        OnlineVARTrainer(model=tiny_text.llama(), reward_funcs=tiny_text.count_topic,
                         args=config(tmp_path, var_reference="initial", sync_ref_model=True),
                         train_dataset=prompts(), processing_class=tiny_text.tokenizer(),
                         peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))


# ----------------------------------------------------------------------------- entropy options


@pytest.mark.parametrize("path", ["in_head", "logits"])
def test_top_entropy_quantile_weights_only_the_high_entropy_tokens(tmp_path, path):
    """GRPO's filter (top_entropy_quantile=0.5): a completion token keeps its weight when its entropy is at or above
    the 0.5-quantile of the micro-batch's completion-token entropies, else it counts 0 (still in n_i, as GRPO
    normalises); loss and gradients against full logits in plain PyTorch (fp32, float64 truth)."""
    trainer, batches = trainer_with_batches(tiny_text.llama(), config(tmp_path, top_entropy_quantile=0.5,
                                                                      learning_rate=1e-12))
    trainer.train()
    batch, model = batches[0], trainer.model
    trainer._var_head(model).in_head = path == "in_head"
    loss, ours = loss_and_grads(trainer, batch)

    def plain(dtype):
        m = tiny_text.llama()  # not a deepcopy: GRPOTrainer patched the trained model's forward
        m.load_state_dict(model.state_dict())
        m = m.to(dtype).train()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        P = batch["prompt_ids"].shape[1]
        logits = m(input_ids=ids, attention_mask=att).logits[:, P - 1:-1]
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, batch["completion_ids"][..., None]).squeeze(-1)
        cm = batch["completion_mask"].bool()
        ent = -(logp.exp() * logp).sum(-1).detach()
        keep = (ent >= torch.quantile(ent[cm].double(), 0.5).to(dtype)) & cm
        s = (lp * keep).sum(1) / cm.sum(1).clamp(min=1)
        value = -(batch["var_weights"].to(dtype) * s).mean()
        value.backward()
        return value.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}, keep, cm

    (v32, g32, keep, cm), (v64, g64, keep64, _) = plain(torch.float32), plain(torch.float64)
    assert torch.equal(keep, keep64) and 0 < int(keep.sum()) < int(cm.sum())  # the filter drops some tokens
    assert_close(loss, v32, v64, name="loss")
    for n in g64:
        assert_close(ours[n], g32[n], g64[n], name=n)
    unfiltered = copy.copy(trainer)
    unfiltered.top_entropy_quantile = 1.0
    assert abs(float(loss_and_grads(unfiltered, batch)[0]) - float(loss)) > 1e-3  # the filter changes the loss


def test_entropy_metric_is_grpos_token_mean(tmp_path):
    """GRPO logs the mean entropy over all completion tokens (long completions count more); on main the mean
    over completions of their own token means. Checked against full logits in plain PyTorch."""
    trainer, batches = trainer_with_batches(tiny_text.llama(), config(tmp_path, learning_rate=1e-12))
    trainer.train()
    batch, model = batches[0], trainer.model
    for i, length in enumerate((1, 2, 4)):  # completions of different lengths (ended early, padded)
        batch["completion_mask"][i, length:] = 0
    trainer._metrics["train"].clear()
    loss_and_grads(trainer, batch)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, batch["prompt_ids"].shape[1] - 1:-1]
                                 .double(), -1)
    ent, cm = -(logp.exp() * logp).sum(-1), batch["completion_mask"].double()
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(float((ent * cm).sum() / cm.sum()), rel=1e-5)


@pytest.mark.parametrize("kw", [dict(entropy_coef=0.01), dict(use_adaptive_entropy=True)])
def test_entropy_bonus_is_refused_with_the_reason(tmp_path, kw):
    with pytest.raises(ValueError, match="entropy_coef must be 0 and use_adaptive_entropy False .* the entropy "
                                         "but not its gradient"):
        config(tmp_path, **kw)
