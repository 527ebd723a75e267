"""OnlineVARTrainer (varkernels/training/online.py) on TRL's GRPOTrainer.

- the weights of a step equal an independent computation from the step's rewards (and, for
  var_reference="initial", from log-probs of π_ref and π_old computed here with plain PyTorch);
- one step's gradient equals the plain weighted NLL of the same completions (full logits, float64 truth);
- a tiny model with a locally built tokenizer trains online on CPU and its held-out reward rises;
- every overridden (or called) TRL method still exists with the signature online.py was written against;
- bad input: config values, NaN / ±inf / wrong-length rewards, None (TRL's "unscorable");
- var_baseline="mean" (centred weights w − 1): the weights against a hand computation (also where the softmax
  underflows), the metrics, the guard against reused generations, the option's validation, a toy run;
- 2 processes (gloo): a prompt's 8 completions are split over the ranks, and each rank's weights equal
  those computed from the whole group's rewards.
"""

import copy
import inspect
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
datasets = pytest.importorskip("datasets")

from helpers import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from _toy import MAX_NEW, Language, pretrain, reward, sample  # noqa: E402
from _toy import tiny_llama as toy_llama  # noqa: E402
from compare_methods import toy_text, toy_tokenizer, trl_reward  # noqa: E402

from varkernels.training.online import (  # noqa: E402
    OnlineVARConfig,
    OnlineVARTrainer,
    online_var_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
G = 4  # completions per prompt in most tests


@pytest.fixture(scope="module")
def toy():
    """(reference policy, language, tokenizer, names): a 2-layer Llama briefly pre-trained on the toy language."""
    torch.manual_seed(0)
    lang = Language(0)
    ref = toy_llama()
    pretrain(ref, lang, 60)
    tok, names = toy_tokenizer()
    return ref, lang, tok, names


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                max_completion_length=MAX_NEW, max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, var_beta=0.2, seed=0,
                var_reference="policy")
    return OnlineVARConfig(**{**base, **kw})


def dataset(lang, names, n=16):
    return datasets.Dataset.from_dict({"prompt": [toy_text(names, x) for x in lang.prompts(n)]})


class Spy:
    """Records, per generation batch: the model's state when it was generated (π_old), the rewards the
    reward function returned (in batch order) and the batch OnlineVARTrainer built (with var_weights)."""

    def __init__(self, trainer, names):
        self.batches, self.rewards, self.states = [], [], []
        inner = trainer._generate_and_score_completions
        base_reward = trl_reward(names)

        def generate_and_score(inputs):
            self.states.append(copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model).state_dict()))
            out = inner(inputs)
            self.batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
            return out

        def toy_reward(prompts, completions, completion_ids, **kw):
            r = base_reward(prompts, completions, completion_ids)
            self.rewards.append(r)
            return r

        trainer._generate_and_score_completions = generate_and_score
        self.reward_func = toy_reward


def make_trainer(toy, tmp_path, **kw):
    ref, lang, tok, names = toy
    policy = copy.deepcopy(ref)
    holder = {}

    def toy_reward(prompts, completions, completion_ids, **kw2):
        return holder["spy"].reward_func(prompts, completions, completion_ids)

    trainer = OnlineVARTrainer(model=policy, reward_funcs=toy_reward, args=config(tmp_path, **kw),
                               train_dataset=dataset(lang, names), processing_class=tok)
    holder["spy"] = Spy(trainer, names)
    return trainer, holder["spy"]


def seq_logps(model, batch) -> torch.Tensor:
    """Σ_t log π(y_t | ·) over each completion's tokens, plain PyTorch on full logits (float64)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    P = batch["prompt_ids"].shape[1]
    return (lp[:, P - 1:] * batch["completion_mask"]).sum(1)


def expected_weights(rewards, beta, q=None):
    """G·softmax_j(r_j/β + q_j) per consecutive group of G, in float64 with math (not online.py's code)."""
    out = []
    for g in range(0, len(rewards), G):
        a = [rewards[g + j] / beta + (float(q[g + j]) if q is not None else 0.0) for j in range(G)]
        m = max(a)
        e = [math.exp(x - m) for x in a]
        out += [G * x / sum(e) for x in e]
    return torch.tensor(out, dtype=torch.float64)


def test_groups_are_consecutive_prompts(toy, tmp_path):
    """The batch holds G consecutive completions of each prompt (what the weights' grouping assumes),
    and TRL's tokenization of the prompt text gives back the toy's token ids."""
    trainer, spy = make_trainer(toy, tmp_path)
    trainer.train()
    b = spy.batches[0]
    ids = b["prompt_ids"]
    assert ids.shape[0] == 2 * G
    for g in range(0, ids.shape[0], G):
        assert (ids[g: g + G] == ids[g]).all()
    assert not (ids[0] == ids[G]).all()
    _, _, tok, names = toy
    assert [names[int(t)] for t in ids[0]] == toy_text(names, ids[0]).split()


@pytest.mark.parametrize("reference", ["policy", "initial"])
def test_weights_equal_an_independent_computation(toy, tmp_path, reference):
    """Two steps; the second step's π_old is the once-updated policy, so for "initial" q ≠ 0."""
    trainer, spy = make_trainer(toy, tmp_path, var_reference=reference, max_steps=2, learning_rate=3e-2)
    trainer.train()
    assert len(spy.batches) == 2
    ref_model = toy[0]
    for step, batch in enumerate(spy.batches):
        rewards = spy.rewards[step]
        q = None
        if reference == "initial":
            old = copy.deepcopy(ref_model)
            old.load_state_dict(spy.states[step])
            q = seq_logps(ref_model, batch) - seq_logps(old, batch)
            if step == 1:
                assert q.abs().max() > 1e-3  # π_old moved: the test exercises q
        want = expected_weights(rewards, 0.2, q)
        got = batch["var_weights"].double()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        assert abs(float(got.sum()) - len(rewards)) < 1e-4  # each group's weights sum to G


def test_gradient_equals_plain_weighted_nll(toy, tmp_path):
    """compute_loss on a micro-batch against −(1/N)·Σ_i w_i·mean_t log π(y_i,t) from full logits."""
    trainer, spy = make_trainer(toy, tmp_path, learning_rate=1e-12)
    trainer.train()  # one step: builds the generation batch (weights) through TRL's own loop
    batch = spy.batches[0]
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    ours = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def plain(trained, dtype):
        m = toy_llama()  # not a deepcopy: GRPOTrainer patched the trained model's forward (bound to it)
        m.load_state_dict(trained.state_dict())
        m = m.to(dtype).train()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        logits = m(input_ids=ids, attention_mask=att).logits[:, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        P = batch["prompt_ids"].shape[1]
        cm = batch["completion_mask"].to(dtype)
        s = (lp[:, P - 1:] * cm).sum(1) / cm.sum(1).clamp(min=1)
        value = -(batch["var_weights"].to(dtype) * s).mean()
        value.backward()
        return value, {n: p.grad.detach().clone() for n, p in m.named_parameters()}

    v32, g32 = plain(model, torch.float32)
    v64, g64 = plain(model, torch.float64)
    assert_close(loss.detach().double(), v32.detach().double(), v64.detach(), name="loss")
    for n in g64:
        assert_close(ours[n].double(), g32[n].double(), g64[n], name=n)
    assert max(float(g.abs().max()) for g in ours.values()) > 1e-3  # a real gradient


def test_trains_online_and_held_out_reward_rises(toy, tmp_path):
    """A few seconds of online VAR (24 steps of 2 prompts × 8) raises the mean reward on 256 held-out
    prompts; the logged loss is the VAR loss and TRL's metric names are logged with var/*."""
    ref, lang, tok, names = toy
    held_out = Language(1).prompts(256)
    before = sum(reward(held_out, sample(ref, held_out, seed=5))) / len(held_out)
    policy = copy.deepcopy(ref)
    args = config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_steps=24, learning_rate=3e-3,
                  logging_steps=24, var_beta=0.1, var_reference="initial")
    # its own prompts (the fixture's Language is shared: its prompts depend on the tests run before)
    trainer = OnlineVARTrainer(model=policy, reward_funcs=trl_reward(names), args=args,
                               train_dataset=dataset(Language(2), names, 64), processing_class=tok)
    losses = []
    inner = trainer.compute_loss

    def spy_loss(*a, **k):
        out = inner(*a, **k)
        losses.append(float(out.detach()))
        return out

    trainer.compute_loss = spy_loss
    trainer.train()
    after = sum(reward(held_out, sample(policy, held_out, seed=5))) / len(held_out)
    assert after > before + 0.05, (before, after)
    log = next(h for h in trainer.state.log_history if "loss" in h)
    for key in ("reward", "reward_std", "completions/mean_length", "num_tokens", "var/weights_max", "var/ess",
                "entropy"):
        assert key in log, key
    assert 1.0 <= log["var/ess"] <= 8.0 and 1.0 <= log["var/weights_max"] <= 8.0
    assert 0.0 < log["entropy"] <= math.log(policy.config.vocab_size)  # nats, of the policy's next-token distribution
    assert log["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)  # the VAR loss, not a surrogate
    assert log["loss"] > 0.1  # a weighted NLL of sampled tokens (GRPO's surrogate would be ≈ 0)


# ----------------------------------------------------------------------------- TRL's surface


TRL_METHODS = {  # what online.py overrides (o) or calls (c), with the parameters it was written against
    "__init__": ("o", ["self", "model", "reward_funcs", "args", "train_dataset", "eval_dataset", "processing_class",
                       "reward_processing_classes", "callbacks", "optimizers", "quantization_config",
                       "peft_config", "tools", "rollout_func", "environment_factory"]),
    "_calculate_rewards": ("o", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
    "_generate_and_score_completions": ("o", ["self", "inputs"]),
    "compute_loss": ("o", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
    "_get_per_token_logps_and_entropies": ("c", ["self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                                 "batch_size"]),
    "get_high_entropy_mask": ("c", ["self", "entropies", "mask", "threshold"]),
}


def test_trl_methods_online_var_relies_on_still_exist():
    """A TRL release that renames or re-signs one of these fails here, not in a user's run."""
    assert trl.__version__.startswith("1.16."), trl.__version__  # the pin of the train extra
    from trl import GRPOTrainer

    for name, (kind, params) in TRL_METHODS.items():
        fn = getattr(GRPOTrainer, name, None)
        assert fn is not None, f"GRPOTrainer.{name} is gone"
        got = list(inspect.signature(fn).parameters)
        assert got[: len(params)] == params, (name, got)
        if kind == "o":
            assert name in OnlineVARTrainer.__dict__, name
            ours = list(inspect.signature(getattr(OnlineVARTrainer, name)).parameters)
            named = [p for p in params if p in ours]  # the rest reaches GRPOTrainer through **kwargs
            assert named == ours[: len(named)], (name, ours)  # positional calls mean the same
    # the generation batch's keys compute_loss reads are produced by GRPO (checked by the tests above
    # running TRL's own loop); and GRPO scales for gradient accumulation itself, as compute_loss does
    assert GRPOTrainer.loss_is_scaled_for_ga is True
    from trl.trainer import grpo_trainer  # the reference-model sync (sync_ref_model) online.py adds itself

    assert list(inspect.signature(grpo_trainer.SyncRefModelCallback).parameters) == ["ref_model", "accelerator"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw, match", [
    (dict(var_beta=0.0), "var_beta must be a finite number > 0"),
    (dict(var_beta=-1.0), "var_beta must be a finite number > 0"),
    (dict(var_beta=float("nan")), "var_beta must be a finite number > 0"),
    (dict(num_generations=1, per_device_train_batch_size=1), "num_generations must be >= 2"),
    (dict(beta=0.04), "beta is GRPO's KL coefficient and must be 0.0"),
    (dict(var_reference="ref"), "var_reference"),
    (dict(var_logp_reduction="max"), "var_logp_reduction"),
    (dict(entropy_coef=0.01), "entropy_coef must be 0"),
])
def test_config_rejects(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_beta_error_says_what_to_do(tmp_path):
    with pytest.raises(ValueError) as e:
        config(tmp_path, beta=0.04)
    msg = str(e.value)
    assert "got 0.04" in msg and "OnlineVARTrainer has no KL term" in msg and "var_beta" in msg
    assert "var_reference='initial' (the default)" in msg and "set var_reference" not in msg


def test_config_defaults_are_quiet_and_keep_grpos_checkpointing(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = config(tmp_path)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True  # GRPO's default
    assert args.dataloader_pin_memory is False  # use_cpu: nothing to pin for
    assert config(tmp_path, activation_checkpointing=False).gradient_checkpointing is False
    with pytest.warns(FutureWarning, match="`gradient_checkpointing` is deprecated"):  # the old name still works
        assert config(tmp_path, gradient_checkpointing=False).activation_checkpointing is False


def test_trainer_rejects_a_grpo_config(toy, tmp_path):
    ref, lang, tok, names = toy
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=G,
                          num_generations=G)
    with pytest.raises(TypeError, match="args must be an OnlineVARConfig, got GRPOConfig"):
        OnlineVARTrainer(model=copy.deepcopy(ref), reward_funcs=trl_reward(names), args=args,
                         train_dataset=dataset(lang, names), processing_class=tok)


def _train_with(toy, tmp_path, reward_funcs, **kw):
    ref, lang, tok, names = toy
    trainer = OnlineVARTrainer(model=copy.deepcopy(ref), reward_funcs=reward_funcs, args=config(tmp_path, **kw),
                               train_dataset=dataset(lang, names), processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_reward_function_returning_nan_or_inf_names_function_and_completion(toy, tmp_path, bad):
    def my_reward(prompts, completions, **kw):
        return [bad if j == 3 else 0.5 for j in range(len(completions))]

    with pytest.raises(ValueError, match=r"reward function 'my_reward' returned .* for completion 3 of the batch"):
        _train_with(toy, tmp_path, my_reward)


def test_async_reward_function_is_checked_too(toy, tmp_path):
    async def my_async_reward(prompts, completions, **kw):
        return [float("nan")] * len(completions)

    with pytest.raises(ValueError, match="reward function 'my_async_reward' returned a non-finite score nan for "
                                         "completion 0"):
        _train_with(toy, tmp_path, my_async_reward)


def test_reward_function_of_wrong_length_names_the_function(toy, tmp_path):
    def short_reward(prompts, completions, **kw):
        return [0.5] * (len(completions) - 1)

    with pytest.raises(ValueError, match="'short_reward' returned 7 rewards for 8 "):
        _train_with(toy, tmp_path, short_reward)


def test_reward_function_without_kwargs_is_told_to_add_them(toy, tmp_path):
    """Issue 25: GRPO calls reward functions with completion_ids, trainer_state, ...; one without **kwargs
    gets an error naming it and the fix instead of a bare TypeError."""
    def no_kwargs(prompts, completions):
        return [0.5] * len(completions)

    with pytest.raises(TypeError, match=r"reward function 'no_kwargs' does not accept .*add \*\*kwargs"):
        _train_with(toy, tmp_path, no_kwargs)


def test_reward_model_returning_nan_names_the_model(toy, tmp_path):
    ref, lang, tok, names = toy
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    rm = transformers.LlamaForSequenceClassification(cfg)
    rm.config._name_or_path = "toy/nan-rm"
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    trainer = OnlineVARTrainer(model=copy.deepcopy(ref), reward_funcs=rm, args=config(tmp_path),
                               train_dataset=dataset(lang, names), processing_class=tok,
                               reward_processing_classes=[tok])
    with pytest.raises(ValueError, match="reward model 'nan-rm' returned nan for completion 0"):
        trainer.train()


def test_none_for_every_function_is_unscorable_weight_zero(toy, tmp_path):
    """TRL's meaning of None from every reward function: the completion is unscorable (no learning
    signal). Here: weight 0, and its group is normalised over the scorable rest (weights sum to their
    number); a group with no scorable completion has all weights 0. A None from one function of
    several only drops that function's term (TRL's nansum)."""
    def first(prompts, completions, **kw):
        # completion 0 of group 0: None everywhere; group 1: None everywhere
        return [None if (j == 0 or j >= G) else 0.1 * j for j in range(len(completions))]

    def second(prompts, completions, **kw):  # a numpy object array: None there is unscorable too
        return np.array([None if (j == 0 or j >= G) else (None if j == 1 else 0.3) for j in range(len(completions))])

    trainer = OnlineVARTrainer(model=copy.deepcopy(toy[0]), reward_funcs=[first, second], args=config(tmp_path),
                               train_dataset=dataset(toy[1], toy[3]), processing_class=toy[2])
    batches = []
    inner = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(inner(inputs)) or batches[-1]
    trainer.train()
    w = batches[0]["var_weights"].double()
    r = [0.1 * 1 + 0.0, 0.2 + 0.3, 0.3 + 0.3]  # completions 1..3 of group 0 (None terms skipped)
    a = [x / 0.2 for x in r]
    e = [math.exp(x - max(a)) for x in a]
    want = torch.tensor([0.0] + [3 * x / sum(e) for x in e] + [0.0] * G, dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=2e-5, atol=1e-6)


def test_weights_helper_bad_input():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        online_var_weights(torch.zeros(6), 4, 0.1)


# ----------------------------------------------------------------------------- var_baseline="mean" (issue 27)

# rewards of 3 groups of G in batch order: group 0 with one unscorable completion, group 1 all scorable,
# group 2 none scorable (None from the only reward function)
CENTRED_REWARDS = [None, 0.0, 1.0, 0.5, 0.3, 0.1, 0.2, 0.0, None, None, None, None]


def hand_weights(rewards, beta):
    """n·softmax_j(r_j/β) over each group's n scorable completions, 0 for the unscorable (float64, math)."""
    out = []
    for g in range(0, len(rewards), G):
        group = rewards[g: g + G]
        a = [r / beta for r in group if r is not None]
        m = max(a, default=0.0)
        total = sum(math.exp(x - m) for x in a)
        out += [0.0 if r is None else len(a) * math.exp(r / beta - m) / total for r in group]
    return out


@pytest.mark.parametrize("var_beta", [0.2, 1e-4])
def test_centred_weights_equal_an_independent_computation(toy, tmp_path, var_beta):
    """var_baseline="mean": the trained weights are w − 1 over each prompt's scorable completions, 0 for the
    unscorable ones. At var_beta=1e-4 the fp32 softmax underflows: scorable completions whose weight is exactly 0
    before centring get exactly −1 (they are not taken for unscorable). var/weights_max and var/ess are those of
    the uncentred weights; the completions table's advantage column holds the centred ones."""
    def scripted(prompts, completions, **kw):
        return CENTRED_REWARDS[: len(completions)]

    ref, lang, tok, names = toy
    trainer = OnlineVARTrainer(model=copy.deepcopy(ref), reward_funcs=scripted, processing_class=tok,
                               args=config(tmp_path, per_device_train_batch_size=3 * G, var_beta=var_beta,
                                           var_baseline="mean"),
                               train_dataset=dataset(lang, names))
    batches = []
    inner = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(inner(inputs)) or batches[-1]
    trainer.train()
    got = batches[0]["var_weights"].double()
    uncentred = hand_weights(CENTRED_REWARDS, var_beta)
    want = torch.tensor([0.0 if r is None else w - 1.0 for r, w in zip(CENTRED_REWARDS, uncentred)],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    assert (got[[0, 8, 9, 10, 11]] == 0).all()  # unscorable: exactly 0
    for g in range(2):  # each group's centred weights sum to 0
        assert abs(float(got[g * G: (g + 1) * G].sum())) < 1e-5
    if var_beta == 1e-4:
        assert uncentred[1] == 0.0 and uncentred[3] == 0.0  # underflowed: 0 before centring …
        valid = torch.tensor([r is not None for r in CENTRED_REWARDS])
        helper = online_var_weights(torch.tensor([r or 0.0 for r in CENTRED_REWARDS]), G, var_beta, valid=valid)
        assert helper[1] == 0.0 and helper[3] == 0.0  # … in online.py's fp32 too
        assert got[1] == -1.0 and got[3] == -1.0  # and exactly −1 after
    log = next(h for h in trainer.state.log_history if "var/ess" in h)
    ess = []
    for g in range(0, len(uncentred), G):
        w = uncentred[g: g + G]
        ess.append(sum(w) ** 2 / sum(x * x for x in w) if any(w) else 0.0)
    assert log["var/weights_max"] == pytest.approx(max(uncentred), rel=1e-5)  # 3.0 or 4.0, not a centred max
    assert log["var/ess"] == pytest.approx(sum(ess) / len(ess), rel=1e-5)
    assert list(trainer._logs["advantages"])[-len(want):] == pytest.approx(want.tolist(), abs=1e-5)


@pytest.mark.parametrize("kw, named", [
    (dict(num_iterations=2), "num_iterations=2"),
    (dict(steps_per_generation=2), "steps_per_generation=2"),  # 2 optimizer steps per generation batch
    (dict(generation_batch_size=4 * G), "generation_batch_size=16"),  # the same, given as the batch size
    (dict(gradient_accumulation_steps=3, steps_per_generation=2), "gradient_accumulation_steps=3"),  # spans 2 steps
])
def test_centred_weights_reject_reused_generations(tmp_path, kw, named):
    """Centring is right only at the sampling policy: every option that trains a generation batch after an
    optimizer step (or twice) raises, naming the options; var_baseline='none' takes them all."""
    with pytest.raises(ValueError, match="var_baseline='mean' needs fresh generations") as e:
        config(tmp_path, var_baseline="mean", **kw)
    msg = str(e.value)
    assert named in msg and "num_iterations=1" in msg and "var_baseline='none'" in msg
    for option in ("num_iterations", "steps_per_generation", "generation_batch_size", "gradient_accumulation_steps"):
        assert option in msg, option
    assert config(tmp_path, **kw).var_baseline == "none"


def test_centred_weights_accept_fresh_generations_and_check_again_at_the_trainer(toy, tmp_path):
    """One generation batch per optimizer step, or several (steps_per_generation dividing the accumulation
    steps), is fine; options changed on the config after it was made are checked again by the trainer."""
    for kw in ({}, dict(gradient_accumulation_steps=2), dict(gradient_accumulation_steps=4, steps_per_generation=2)):
        config(tmp_path, var_baseline="mean", **kw)
    args = config(tmp_path, var_baseline="mean")
    args.num_iterations = 2
    ref, lang, tok, names = toy
    with pytest.raises(ValueError, match="num_iterations=2"):
        OnlineVARTrainer(model=copy.deepcopy(ref), reward_funcs=trl_reward(names), args=args,
                         train_dataset=dataset(lang, names), processing_class=tok)


def test_var_baseline_option_is_validated(tmp_path):
    assert config(tmp_path).var_baseline == "none"  # the default (docs/online.md says why)
    with pytest.raises(ValueError, match=r"var_baseline must be one of \['none', 'mean'\], got 'centred'"):
        config(tmp_path, var_baseline="centred")
    with pytest.raises(TypeError, match=r"var_baseline must be one of \['none', 'mean'\], got None"):
        config(tmp_path, var_baseline=None)


def test_centred_weights_train_online_and_held_out_reward_rises(toy, tmp_path):
    """The toy run of test_trains_online_and_held_out_reward_rises with var_baseline="mean": the negative
    weights go through the fused-linear loss and the held-out reward still rises."""
    ref, lang, tok, names = toy
    held_out = Language(1).prompts(256)
    before = sum(reward(held_out, sample(ref, held_out, seed=5))) / len(held_out)
    policy = copy.deepcopy(ref)
    args = config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_steps=24, learning_rate=3e-3,
                  logging_steps=24, var_beta=0.1, var_reference="initial", var_baseline="mean")
    trainer = OnlineVARTrainer(model=policy, reward_funcs=trl_reward(names), args=args,
                               train_dataset=dataset(Language(2), names, 64), processing_class=tok)
    trainer.train()
    after = sum(reward(held_out, sample(policy, held_out, seed=5))) / len(held_out)
    assert after > before + 0.05, (before, after)


# ----------------------------------------------------------------------------- 2 processes


def _two_rank_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        lang = Language(0)
        model = toy_llama()  # same seed on both ranks: the same weights
        tok, names = toy_tokenizer()
        base = trl_reward(names)
        local = {}

        def toy_reward(prompts, completions, completion_ids, **kw):
            local["rewards"] = base(prompts, completions, completion_ids)
            local["prompts"] = list(prompts)
            return local["rewards"]

        # 8 completions of one prompt per step, 4 on each rank: the group is split over the ranks
        args = OnlineVARConfig(output_dir=out_dir, per_device_train_batch_size=4, num_generations=8,
                               max_completion_length=MAX_NEW, max_steps=1, learning_rate=1e-3, report_to=[],
                               use_cpu=True, save_strategy="no", disable_tqdm=True, bf16=False, var_beta=0.2,
                               seed=0, logging_steps=1, var_reference="policy")
        trainer = OnlineVARTrainer(model=model, reward_funcs=toy_reward, args=args,
                                   train_dataset=dataset(lang, names), processing_class=tok)
        got = {}
        inner = trainer._generate_and_score_completions

        def spy(inputs):
            out = inner(inputs)
            got["weights"] = out["var_weights"].clone()
            return out

        trainer._generate_and_score_completions = spy
        trainer.train()
        torch.save({"rewards": local["rewards"], "prompts": local["prompts"], "weights": got["weights"],
                    "world": trainer.accelerator.num_processes},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    os._exit(0)  # as in tests/test_distributed.py: skip a teardown that can deadlock


def test_two_ranks_weights_use_the_whole_group(tmp_path):
    from _distributed import _run  # the spawning helper of the other 2-process tests

    _run(_two_rank_worker, str(tmp_path), deadline_s=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2 and len(r0["rewards"]) == len(r1["rewards"]) == 4
    assert set(r0["prompts"]) == set(r1["prompts"]) and len(set(r0["prompts"])) == 1  # one prompt, split
    rewards = r0["rewards"] + r1["rewards"]
    a = [x / 0.2 for x in rewards]
    e = [math.exp(x - max(a)) for x in a]
    want = torch.tensor([8 * x / sum(e) for x in e], dtype=torch.float64)
    got = torch.cat([r0["weights"], r1["weights"]]).double()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    # the weights a rank would form from its own 4 completions differ (the test can fail)
    a0 = a[:4]
    e0 = [math.exp(x - max(a0)) for x in a0]
    local = torch.tensor([4 * x / sum(e0) for x in e0], dtype=torch.float64)
    if max(rewards[:4]) != min(rewards[:4]) or max(rewards) != min(rewards):
        assert not torch.allclose(got[:4], local, atol=1e-4)


def test_peft_initial_reference_is_the_base_model(toy, tmp_path):
    """PEFT with var_reference="initial": π_ref is the model with the adapter switched off. Second step's
    q equals log π_base − log π_old, π_old the merged adapter at generation time (plain PyTorch here)."""
    peft = pytest.importorskip("peft", reason="optional extra: pip install peft")
    ref, lang, tok, names = toy
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    holder = {}

    def toy_reward(prompts, completions, completion_ids, **kw):
        return holder["spy"].reward_func(prompts, completions, completion_ids)

    trainer = OnlineVARTrainer(model=copy.deepcopy(ref), reward_funcs=toy_reward,
                               args=config(tmp_path, var_reference="initial", max_steps=2, learning_rate=3e-2),
                               train_dataset=dataset(lang, names), processing_class=tok,
                               peft_config=peft.LoraConfig(**lora))
    assert trainer.ref_model is None  # no copy: the adapter is switched off instead
    spy = holder["spy"] = Spy(trainer, names)
    trainer.train()
    for step, batch in enumerate(spy.batches):
        old = peft.get_peft_model(copy.deepcopy(ref), peft.LoraConfig(**lora))
        missing, unexpected = old.load_state_dict(spy.states[step], strict=False)
        assert not unexpected and not [k for k in missing if 'lora' in k], (missing, unexpected)
        old = old.merge_and_unload()
        q = seq_logps(ref, batch) - seq_logps(old, batch)
        assert q.abs().max() > 1e-3  # init_lora_weights=False: the adapter changes the model from step 0
        torch.testing.assert_close(batch["var_weights"].double(), expected_weights(spy.rewards[step], 0.2, q),
                                   rtol=2e-5, atol=1e-6)


def test_head_benchmark_providers_compute_the_same_gradient():
    """benchmarks/bench_online_head.py times two paths to the same gradient: with every token a
    completion token and ρ = 1, GRPO's dapo loss −Σ A_i·lp / (B·T) and the weighted NLL
    −(1/B)·Σ w_i·mean_t lp have equal gradients when A = w. (Also fails if TRL moves its chunked head.)"""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_online_head
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    torch.manual_seed(3)
    B, T, H, V = 2, 5, 16, 37
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    w = torch.rand(B) * 2
    grads = {}
    for name, fn in bench_online_head.providers(hidden, weight, labels, w).items():
        hidden.grad = weight.grad = None
        fn()
        grads[name] = (hidden.grad.clone(), weight.grad.clone())
    torch.testing.assert_close(grads["online_var"][0], grads["grpo_trl"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["online_var"][1], grads["grpo_trl"][1], rtol=1e-5, atol=1e-6)
