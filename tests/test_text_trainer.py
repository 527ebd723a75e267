"""VARTrainer from text (TRL's datasets and reward contract): every score it trains on against a direct computation."""

import copy
import functools
import logging
import math
import os
import time
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import tiny_text  # noqa: E402
from tiny_text import brute_force_logp, count_topic, llama, reward_model_and_tokenizer, rows, tokenizer  # noqa: E402

from varkernels.training.data import VARDataset  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                disable_tqdm=True, seed=0, group_size=4, max_steps=2, per_device_train_batch_size=1,
                learning_rate=1e-2)
    return VARConfig(**{**base, **kw})


def check_scores(ds, ref, reward_of_pair, atol=1e-5):
    """R[g, i, j] == reward(prompt of example idx[i], completion of example idx[j]) and Q[g, i, j] ==
    mean log π_ref(y_j | x_i) from a plain forward, for every group and pair."""
    ex = ds.examples
    for g, idx in enumerate(ds.groups):
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                assert ds.rewards[g, a, b].item() == pytest.approx(reward_of_pair(i, j), abs=1e-6), (g, a, b)
                q = brute_force_logp(ref, ex.prompts[i], ex.completions[j])
                assert abs(ds.ref_logps[g, a, b].item() - q) < atol, (g, a, b)


def trained(model, start):
    return max((p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters())


def test_standard_prompt_completion_with_a_reward_on_text(tmp_path):
    tok, data = tokenizer(), rows(8)
    model = llama()
    initial = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = VARTrainer(model=model, args=config(tmp_path), train_dataset=datasets.Dataset.from_list(data),
                         eval_dataset=rows(4, seed=30), processing_class=tok, reward_funcs=count_topic)
    ds, ex = trainer.train_dataset, trainer.train_dataset.examples
    assert isinstance(trainer.eval_dataset, VARDataset) and len(trainer.eval_dataset) == 1
    assert isinstance(ds, VARDataset) and ds.rewards.shape == (2, 4, 4) and len(ex) == 8
    for k, row in enumerate(data):  # BOS + prompt; completion + EOS; labels only on the completion
        assert ex.prompts[k].tolist() == tok(row["prompt"])["input_ids"]
        assert ex.completions[k].tolist() == tok(row["completion"], add_special_tokens=False)["input_ids"] + [1]
    item = ds[0]
    r, k = 0, ds.groups[0][0]
    P, C = len(ex.prompts[k]), len(ex.completions[k])
    assert (item["labels"][r, :P] == -100).all() and item["labels"][r, P : P + C].tolist() == ex.completions[k].tolist()
    check_scores(ds, initial, lambda i, j: count_topic([data[i]["prompt"]], [data[j]["completion"]],
                                                       topic=[data[i]["topic"]])[0])
    trainer.train()
    assert trained(model, start) > 1e-4
    log = trainer.state.log_history[0]
    for key in ("reward", "reward_std", "num_tokens", "var/ess", "var/rewards"):
        assert key in log, key
    assert log["reward"] == pytest.approx(log["var/rewards"])
    g = ds.groups  # the 2 steps saw both groups once (1 group per step): num_tokens counts their tokens
    n_tokens = sum(len(ex.prompts[k]) + len(ex.completions[k]) for grp in g for k in grp)
    assert trainer.state.log_history[1]["num_tokens"] == n_tokens
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_reward", "eval_reward_std", "eval_var/ess"} <= set(metrics)


def test_conversational_with_a_chat_template(tmp_path):
    tok, data = tokenizer(), rows(8, seed=1)
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in data]

    def length(prompts, completions, **kwargs):
        assert isinstance(prompts[0], list) and completions[0][0]["role"] == "assistant"  # messages, as in TRL
        return [float(len(c[0]["content"].split())) - 0.1 * len(p[0]["content"].split())
                for p, c in zip(prompts, completions)]

    model = llama()
    initial = copy.deepcopy(model)
    trainer = VARTrainer(model=model, args=config(tmp_path), train_dataset=conv, processing_class=tok,
                         reward_funcs=length)
    ex = trainer.train_dataset.examples
    assert ex.conversational
    for k, row in enumerate(data):
        p_text = f"user: {row['prompt']} assistant: "
        assert ex.prompts[k].tolist() == tok(p_text, add_special_tokens=False)["input_ids"]
        # the template ends the assistant turn with <eos>: it is not appended a second time
        assert ex.completions[k].tolist() == tok(row["completion"] + " <eos>", add_special_tokens=False)["input_ids"]
    check_scores(trainer.train_dataset, initial, lambda i, j: length([conv[i]["prompt"]], [conv[j]["completion"]])[0])
    trainer.train()
    assert trainer.state.global_step == 2


def test_preference_dataset_each_response_an_example(tmp_path):
    tok, data = tokenizer(), rows(8, seed=2)
    pref = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows(8, seed=3)[k]["completion"],
             "topic": r["topic"]} for k, r in enumerate(data)]
    model = llama()
    initial = copy.deepcopy(model)
    trainer = VARTrainer(model=model, args=config(tmp_path, group_size=4), train_dataset=pref, processing_class=tok,
                         reward_funcs=count_topic)
    ex = trainer.train_dataset.examples
    assert len(ex) == 16 and ex.format == "preference"
    assert ex.names[3] == "example 3 (train_dataset row 1, rejected)"
    assert ex.completion_texts[2] == pref[1]["chosen"] and ex.completion_texts[3] == pref[1]["rejected"]
    assert ex.prompts[2].tolist() == ex.prompts[3].tolist()
    check_scores(trainer.train_dataset, initial,
                 lambda i, j: count_topic([], [ex.completion_texts[j]], topic=[ex.columns["topic"][i]])[0])
    trainer.train()


def test_reward_model_with_its_own_tokenizer_batched_without_pad(tmp_path, monkeypatch):
    tok, data = tokenizer(), rows(8, seed=4)
    rm, rm_tok = reward_model_and_tokenizer()
    calls = []
    hook = rm.register_forward_hook(lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)

    def direct(i, j):  # one unpadded sequence of the reward model's own tokens: no pad id involved
        ids = rm_tok(data[i]["prompt"] + data[j]["completion"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return rm(torch.tensor([ids])).logits[0, 0].item()

    model = llama()
    initial = copy.deepcopy(model)
    trainer = VARTrainer(model=model, args=config(tmp_path), train_dataset=data, processing_class=tok,
                         reward_funcs=[rm], reward_processing_classes=[rm_tok])
    assert calls and max(calls) == 16 and sum(calls) == 32  # each group's 16 pairs in one forward
    assert rm.config.pad_token_id is None  # set for the call only
    hook.remove()
    check_scores(trainer.train_dataset, initial, direct)
    trainer.train()


def test_model_as_a_path_string(tmp_path):
    tok, data = tokenizer(), rows(8, seed=5)
    path = tmp_path / "tiny"
    llama(seed=3).save_pretrained(path)
    tok.save_pretrained(path)
    args = config(tmp_path, model_init_kwargs={"dtype": "float32"})
    trainer = VARTrainer(model=str(path), args=args, train_dataset=data, reward_funcs=count_topic)  # tokenizer too
    assert isinstance(trainer.model, transformers.LlamaForCausalLM) and trainer.processing_class.eos_token == "<eos>"
    initial = transformers.AutoModelForCausalLM.from_pretrained(path)
    check_scores(trainer.train_dataset, initial, lambda i, j: count_topic([], [data[j]["completion"]],
                                                                          topic=[data[i]["topic"]])[0])
    trainer.train()
    assert trained(trainer.model, dict(initial.named_parameters())) > 1e-4


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_only_adapters_train(tmp_path):
    peft = pytest.importorskip("peft", reason="optional extra: pip install peft")
    tok, data = tokenizer(), rows(8, seed=6)
    model = llama()
    initial = copy.deepcopy(model)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    trainer = VARTrainer(model=model, args=config(tmp_path), train_dataset=data, processing_class=tok,
                         reward_funcs=count_topic, peft_config=lora)
    check_scores(trainer.train_dataset, initial, lambda i, j: count_topic([], [data[j]["completion"]],
                                                                          topic=[data[i]["topic"]])[0])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == {n for n in before if "lora_" in n}


def test_reward_column_shared_context_and_weights(tmp_path):
    tok, data = tokenizer(), rows(8, seed=7)
    for k, r in enumerate(data):
        r["reward"] = 0.25 * k
    model = llama()
    trainer = VARTrainer(model=model, args=config(tmp_path), train_dataset=data, processing_class=tok)
    ds = trainer.train_dataset
    assert not ds.cross_pairs and ds.rewards.shape == (2, 4)
    for g, idx in enumerate(ds.groups):
        assert ds.rewards[g].tolist() == [0.25 * k for k in idx]
    # two functions, weighted: R = 2·f1 − f2 (TRL's reward_weights)
    n_words = lambda prompts, completions, **kw: [float(len(c.split())) for c in completions]  # noqa: E731
    trainer = VARTrainer(model=llama(), args=config(tmp_path, reward_weights=[2.0, -1.0]), train_dataset=data,
                         processing_class=tok, reward_funcs=[count_topic, n_words])
    ds = trainer.train_dataset
    for g, idx in enumerate(ds.groups):
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                c = data[j]["completion"]
                assert ds.rewards[g, a, b].item() == 2 * c.split().count(data[i]["topic"]) - len(c.split())


def test_prebuilt_var_dataset_still_works(tmp_path):
    from tiny_trainer import make_dataset, tiny_llama

    trainer = VARTrainer(model=tiny_llama(), args=config(tmp_path), train_dataset=make_dataset())
    trainer.train()
    assert trainer.state.global_step == 2


# ----------------------------------------------------------------------------- the traps


def test_errors_name_the_users_example_and_the_function(tmp_path):
    tok, data = tokenizer(), rows(12, seed=8)

    def nan_at_9(prompts, completions, **kw):
        return [math.nan if c == data[9]["completion"] and p == data[9]["prompt"] else 0.0
                for p, c in zip(prompts, completions)]

    with pytest.raises(ValueError, match=r"reward function 'nan_at_9' returned a non-finite score nan for example 9 "
                                         r"\(train_dataset row 9\)"):
        VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                   reward_funcs=nan_at_9)

    def text_at_3(prompts, completions, **kw):
        return ["good" if c == data[3]["completion"] else 1.0 for c in completions]

    with pytest.raises(TypeError, match=r"'text_at_3' returned str 'good' for .*example 3 \(train_dataset row 3\)"):
        VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                   reward_funcs=text_at_3)
    with pytest.raises(ValueError, match=r"'_short' returned 1 rewards for 16"):
        VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                   reward_funcs=_short)
    # a token outside the model's vocabulary: the tokenizer knows 'x' but the model's vocabulary stops before it
    big = tokenizer(tiny_text.WORDS + ["x"])
    bad = [dict(r) for r in data]
    bad[5]["completion"] = "w1 x"
    with pytest.raises(ValueError, match=r"example 5 \(train_dataset row 5\): the completion has token id 32 outside "
                                         r"the model's vocabulary \[0, 32\)"):
        VARTrainer(model=llama(), args=config(tmp_path), train_dataset=bad, processing_class=big,
                   reward_funcs=count_topic)


def _short(prompts, completions, **kw):
    return [0.0]


def test_token_level_errors_name_the_users_example():
    """VARDataset.build on token ids: positions inside a group used to be reported (responses[3], pair (0, 2))."""
    from tiny_trainer import V, tiny_llama

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (3,), generator=g) for _ in range(8)]
    responses = [torch.randint(0, V, (2,), generator=g) for _ in range(8)]
    responses[0] = torch.tensor([1, V])
    ref = tiny_llama().eval()
    ok = lambda xs, ys: [0.0] * len(xs)  # noqa: E731
    with pytest.raises(ValueError, match=r"responses\[0\] has token id 40 outside"):
        VARDataset.build(prompts, responses, ref_model=ref, reward=ok, group_size=4)
    responses[0] = torch.tensor([1, 2])
    target = responses[6]

    def nan_for_6(xs, ys):
        return [math.nan if y is target and x is prompts[6] else 0.0 for x, y in zip(xs, ys)]

    with pytest.raises(ValueError, match=r"'nan_for_6' returned a non-finite score nan for example 6"):
        VARDataset.build(prompts, responses, ref_model=ref, reward=nan_for_6, group_size=4)
    with pytest.raises(ValueError, match=r"returned None for (example|the prompt of example) \d"):
        VARDataset.build(prompts, responses, ref_model=ref, reward=lambda xs, ys: [None] * len(xs), group_size=4)


def test_group_size_one_is_an_error(tmp_path):
    from tiny_trainer import V, tiny_llama

    with pytest.raises(ValueError, match=r"group_size must be an int >= 2, got 1.*plain SFT"):
        config(tmp_path, group_size=1)
    xs = [torch.tensor([1, 2])] * 4
    with pytest.raises(ValueError, match=r"group_size must be an int >= 2, got 1"):
        VARDataset.build(xs, xs, ref_model=tiny_llama(), reward=lambda a, b: [0.0] * len(a), group_size=1)
    assert V == 40


def test_fully_masked_examples_are_dropped_with_a_count(tmp_path, caplog):
    tok, data = tokenizer(), rows(10, seed=9)
    data[2]["prompt"] = " ".join(["w1"] * 12)  # 13 tokens with BOS: no room for the completion in max_length=12
    data[7]["prompt"] = " ".join(["w2"] * 11)  # 12 tokens: none either
    with caplog.at_level(logging.WARNING, logger="varkernels.training.text"):
        trainer = VARTrainer(model=llama(), args=config(tmp_path, max_length=12), train_dataset=data,
                             processing_class=tok, reward_funcs=count_topic)
    assert trainer.dropped_examples == {"train_dataset": 2}
    assert "dropped 2 of 10 examples" in caplog.text and "fully masked" in caplog.text
    ex = trainer.train_dataset.examples
    assert len(ex) == 8 and all(len(p) + len(c) <= 12 and len(c) > 0 for p, c in zip(ex.prompts, ex.completions))
    assert "row 2)" not in " ".join(ex.names) and ex.names[2] == "example 3 (train_dataset row 3)"


def test_none_rewards_mean_no_reward_from_that_function(tmp_path):
    """TRL's meaning: a function returning None gives no reward for that pair; the others' weighted sum
    stands. A pair that no function scores is an error naming the functions and the examples."""
    tok, data = tokenizer(), rows(8, seed=10)

    def only_w0(prompts, completions, topic, **kw):
        return [1.0 if t == "w0" else None for t in topic]

    trainer = VARTrainer(model=llama(), args=config(tmp_path, reward_weights=[10.0, 1.0]), train_dataset=data,
                         processing_class=tok, reward_funcs=[only_w0, count_topic])
    ds = trainer.train_dataset
    for g, idx in enumerate(ds.groups):
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                expected = (10.0 if data[i]["topic"] == "w0" else 0.0) + data[j]["completion"].split().count(
                    data[i]["topic"])
                assert ds.rewards[g, a, b].item() == expected
    with pytest.raises(ValueError, match=r"every reward function \('only_w0'\) returned None for .*example \d+ "
                                         r"\(train_dataset row \d+\).*VAR needs a reward for every"):
        VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                   reward_funcs=only_w0)


# ----------------------------------------------------------------------------- cache


def _cache_files(tmp_path):
    return sorted((tmp_path / "out" / "var_scores").glob("var-scores-*.pt"))


def build_twice(tmp_path, make_reward, monkeypatch):
    """Two trainers with rewards from ``make_reward()``; returns how many times the second one scored."""
    import varkernels.training.scoring as scoring

    tok, data = tokenizer(), rows(8, seed=11)
    VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
               reward_funcs=make_reward())
    calls = []
    original = scoring.score_groups
    monkeypatch.setattr(scoring, "score_groups", lambda *a, **k: calls.append(1) or original(*a, **k))
    VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
               reward_funcs=make_reward())
    monkeypatch.undo()
    return len(calls)


class Threshold:
    """A callable instance: datasets' Hasher pickles its attributes."""

    def __init__(self, t):
        self.t = t

    def __call__(self, prompts, completions, **kw):
        return [float(len(c.split()) > self.t) for c in completions]


def longer_than(t):
    def reward(prompts, completions, **kw):  # a closure: pickled by value, with the value of t
        return [float(len(c.split()) > t) for c in completions]

    return reward


def test_cache_partial_instance_and_closure_hit_and_their_state_counts(tmp_path, monkeypatch):
    # a functools.partial, a callable instance and a closure are hashed from their parts: the cache hits ...
    assert build_twice(tmp_path, lambda: functools.partial(count_topic), monkeypatch) == 0
    assert build_twice(tmp_path, lambda: Threshold(2), monkeypatch) == 0
    assert build_twice(tmp_path, lambda: longer_than(2), monkeypatch) == 0
    assert len(_cache_files(tmp_path)) == 3
    # ... and a change of their state (an attribute, the value a closure holds) misses it
    counter = iter([1, 3])
    assert build_twice(tmp_path, lambda: Threshold(next(counter)), monkeypatch) == 1
    counter = iter([1, 3])
    assert build_twice(tmp_path, lambda: longer_than(next(counter)), monkeypatch) == 1


def test_cache_sees_a_reward_model_swapped_inside_a_callable(tmp_path, monkeypatch):
    rm, rm_tok = reward_model_and_tokenizer(pad_token_id=3)
    holder = {"model": rm}

    def via_model(prompts, completions, **kw):  # a reward model wrapped in a callable
        from varkernels.training.rewards import RewardFunctions

        return RewardFunctions(holder["model"], reward_processing_classes=rm_tok)(prompts, completions).tolist()

    tok, data = tokenizer(), rows(8, seed=12)
    first = VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                       reward_funcs=via_model).train_dataset
    with torch.no_grad():
        holder["model"] = copy.deepcopy(rm)
        holder["model"].score.weight.mul_(-1.0)  # another reward model: the old scores must not be reused
    second = VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                        reward_funcs=via_model).train_dataset
    assert torch.allclose(second.rewards, -first.rewards, atol=1e-6) and not torch.equal(second.rewards, first.rewards)
    assert len(_cache_files(tmp_path)) == 2


def test_unhashable_reward_is_not_cached_with_one_warning(tmp_path, monkeypatch):
    from varkernels.training import cache

    monkeypatch.setattr(cache, "_WARNED", [])  # the warning is given once per process
    state = (k for k in range(3))  # a generator: dill cannot pickle it, so neither can datasets' Hasher

    def uses_state(prompts, completions, **kw):
        assert state is not None
        return [0.0] * len(prompts)

    tok, data = tokenizer(), rows(8, seed=13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok,
                       reward_funcs=uses_state)
    not_cached = [str(w.message) for w in caught if "not cached" in str(w.message)]
    assert len(not_cached) == 1 and "generator" in not_cached[0] and "reward_fingerprint=" in not_cached[0]
    assert _cache_files(tmp_path) == []


KILLED_WRITER = """
import sys, time, torch
from pathlib import Path
from varkernels.training import cache

def slow_save(obj, f):                 # writes half a file, then hangs: the run is killed here
    Path(f).write_bytes(b"PK half a zip")
    time.sleep(600)

torch.save = slow_save
cache.save_scores(Path(sys.argv[1]) / "var-scores-0123456789abcdef.pt", "key", [[0, 1]],
                  torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
"""


def test_a_killed_writer_leaves_no_cache_file_and_nothing_is_swept(tmp_path):
    import signal
    import subprocess
    import sys

    folder = tmp_path / "out" / "var_scores"
    folder.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder)], env=env)
    deadline = time.monotonic() + 120
    while not list(folder.glob("*.tmp")):
        assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start its save"
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)  # a killed run: its temporary file stays, the cache file was never renamed in
    writer.wait()
    (half,) = folder.glob("*.tmp")
    assert not (folder / "var-scores-0123456789abcdef.pt").exists()
    users = folder / "tmpk2j4h1x0.tmp"  # a file of the user's, two hours old: never deleted by a pattern
    users.write_bytes(b"mine")
    os.utime(users, (time.time() - 7200, time.time() - 7200))
    tok, data = tokenizer(), rows(8, seed=14)
    VARTrainer(model=llama(), args=config(tmp_path), train_dataset=data, processing_class=tok, reward_funcs=count_topic)
    assert half.exists() and users.read_bytes() == b"mine"
    assert len(_cache_files(tmp_path)) == 1 and len(list(folder.glob("*.tmp"))) == 2


def test_token_level_build_takes_lists_of_ids_and_points_text_to_the_trainer():
    from tiny_trainer import tiny_llama

    ref = tiny_llama().eval()
    ids = [[1, 2, 3], [4, 5], [6], [7, 8]]
    zero = lambda xs, ys: [0.0] * len(xs)  # noqa: E731
    ds = VARDataset.build(ids, ids, ref_model=ref, reward=zero, group_size=2)
    assert ds.prompts[0].dtype == torch.long and ds.prompts[1].tolist() == [4, 5]
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a 1-D torch.Tensor .*got str.*VARTrainer"):
        VARDataset.build(["a b"] * 4, ids, ref_model=ref, reward=zero, group_size=2)
    with pytest.raises(TypeError, match=r"got Tensor \(a padded \[N, T\] tensor"):
        VARDataset.build(torch.ones(4, 3, dtype=torch.long), ids, ref_model=ref, reward=zero, group_size=2)


def test_reward_functions_contract_for_any_trainer():
    """RewardFunctions on its own (what an online trainer calls on its generations)."""
    from varkernels.training.rewards import RewardFunctions

    def maybe(prompts, completions, **kw):
        return [None if c == "skip" else 1.0 for c in completions]

    rm, rm_tok = reward_model_and_tokenizer()
    rf = RewardFunctions([maybe, rm], reward_weights=[2.0, 1.0], reward_processing_classes=[None, rm_tok])
    assert rf.names == ["maybe", "LlamaForSequenceClassification"]
    per = rf.per_function(["w1", "w2"], [" w3", "skip"])
    assert per.shape == (2, 2) and per[0, 0] == 1.0 and math.isnan(per[1, 0])
    with torch.no_grad():
        direct = [rm(torch.tensor([rm_tok(t, add_special_tokens=False)["input_ids"]])).logits[0, 0].item()
                  for t in ("w1 w3", "w2skip")]
    total = rf(["w1", "w2"], [" w3", "skip"])
    assert torch.allclose(total, torch.tensor([2.0 + direct[0], direct[1]]), atol=1e-5)
    with pytest.raises(ValueError, match=r"pass its tokenizer as reward_processing_classes\[0\]"):
        RewardFunctions(rm)
    with pytest.raises(ValueError, match=r"reward_weights must have one weight per reward function \(2\), got 1"):
        RewardFunctions([maybe, maybe], reward_weights=[1.0])
    with pytest.raises(ValueError, match=r"reward_processing_classes must have one entry per reward function"):
        RewardFunctions([maybe], reward_processing_classes=[None, None])
    with pytest.raises(TypeError, match=r"reward_funcs\[1\] must be a callable"):
        RewardFunctions([maybe, 3])


def test_reward_batch_size_is_checked():
    """A batch size of 0 or below is an error naming it (it used to mean "all" or an empty range)."""
    from varkernels.training.rewards import RewardFunctions, classifier_scores

    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=rf"batch_size must be a positive int or None, got {bad!r}"):
            RewardFunctions([lambda prompts, completions, **kw: [1.0] * len(completions)], batch_size=bad)
        with pytest.raises(ValueError, match=rf"batch_size must be a positive int or None, got {bad!r}"):
            classifier_scores(None, [], batch_size=bad)


def test_reward_function_without_kwargs_is_told_to_add_them():
    """Issue 25: TRL's keywords (completion_ids, the other columns) reach every reward function; one written
    without **kwargs gets an error naming it and the fix, not a bare 'unexpected keyword argument'."""
    from varkernels.training.rewards import RewardFunctions

    def strict(prompts, completions):
        return [1.0] * len(completions)

    with pytest.raises(TypeError, match=r"reward function 'strict' does not accept .*'completion_ids'.*add \*\*kwargs"):
        RewardFunctions(strict).per_function(["w1"], [" w2"], completion_ids=[[5]])

    def broken(prompts, completions, **kw):  # a TypeError of its own is not rewritten
        return [len(c) + "x" for c in completions]

    with pytest.raises(TypeError, match="unsupported operand"):
        RewardFunctions(broken).per_function(["w1"], [" w2"], completion_ids=[[5]])


def test_num_tokens_is_trainers_count_and_survives_a_resume(tmp_path):
    """num_tokens is Trainer's num_input_tokens_seen (non-padding tokens, all ranks), kept in the checkpoint."""
    tok, data = tokenizer(), rows(8, seed=15)
    args = dict(save_strategy="steps", save_steps=1, max_steps=1)
    first = VARTrainer(model=llama(), args=config(tmp_path, **args), train_dataset=data, processing_class=tok,
                       reward_funcs=count_topic)
    first.train()
    ex, groups = first.train_dataset.examples, first.train_dataset.groups
    tokens = [sum(len(ex.prompts[k]) + len(ex.completions[k]) for k in grp) for grp in groups]
    assert first.state.log_history[0]["num_tokens"] in tokens
    again = VARTrainer(model=llama(), args=config(tmp_path, **{**args, "max_steps": 2}), train_dataset=data,
                       processing_class=tok, reward_funcs=count_topic)
    again.train(resume_from_checkpoint=True)
    assert again.state.log_history[-2]["num_tokens"] == sum(tokens)
