"""Cross-pair scoring (varkernels.training.pairs) and VAR dataset preparation (varkernels.training.data)."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from varkernels.training.data import (  # noqa: E402
    GroupShuffleSampler,
    VARCollator,
    VARDataset,
    make_groups,
)
from varkernels.training.pairs import (  # noqa: E402
    cross_pair_logps,
    cross_pair_rewards,
    paired_logps,
    paired_rewards,
)

V = 40


# tiny models: see the one_torch_thread fixture in conftest.py
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **kw,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def random_lists(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g) for _ in range(n)]


def brute_force_logps(model, prompts, responses, reduction):
    """Q[i, j] from one full forward of x_i ⊕ y_j and a float64 log-softmax of the logits."""
    Q = torch.empty(len(prompts), len(responses), dtype=torch.float64)
    with torch.no_grad():
        for i, x in enumerate(prompts):
            for j, y in enumerate(responses):
                logits = model(torch.cat([x, y])[None]).logits[0].double()
                lp = torch.log_softmax(logits[len(x) - 1 : -1], -1).gather(-1, y[:, None]).sum()
                Q[i, j] = lp / len(y) if reduction == "mean" else lp
    return Q


def assert_close(actual, expected, atol, rtol=0.0):
    err = (actual.double() - expected.double()).abs()
    tol = atol + rtol * expected.double().abs()
    worst = int(err.argmax())
    assert bool((err <= tol).all()), (
        f"max abs err {err.max().item():.3g} at flat index {worst} (tolerance {tol.flatten()[worst].item():.3g})"
    )


class NoKeepLM(torch.nn.Module):
    """A causal LM without ``logits_to_keep`` or ``get_output_embeddings``: forces the logits path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        # transformers 5.24 renamed past_key_values to cache; older versions only know the old name
        name = "cache" if "cache" in inspect.signature(self.inner.forward).parameters else "past_key_values"
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{name: cache})


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_prefix_shared_equals_per_pair(reduction):
    model = tiny_llama()
    prompts, responses = random_lists(5, 1, 7, 1), random_lists(5, 1, 6, 2)
    shared = cross_pair_logps(model, prompts, responses, reduction=reduction, share_prefix=True)
    per_pair = cross_pair_logps(model, prompts, responses, reduction=reduction, share_prefix=False)
    shared_small_batches = cross_pair_logps(model, prompts, responses, reduction=reduction, batch_size=2)
    per_pair_one = cross_pair_logps(model, prompts, responses, reduction=reduction, share_prefix=False, batch_size=1)
    truth = brute_force_logps(model, prompts, responses, reduction)
    assert shared.shape == (5, 5) and shared.dtype == torch.float32
    for got in (shared, per_pair, shared_small_batches, per_pair_one):
        assert_close(got, truth, atol=1e-5, rtol=1e-5)
    assert_close(shared, per_pair, atol=1e-5, rtol=1e-5)


ARCHITECTURES = {
    # absolute position embeddings: the left-padded prompts need explicit position ids
    "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0),
    # sliding-window layers (window < prompt + response) and a final-logit softcap
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, final_logit_softcapping=5.0),
    "mistral-sliding-window": lambda: transformers.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefix_shared_other_architectures(arch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).eval()
    prompts, responses = random_lists(4, 1, 7, 21), random_lists(4, 1, 6, 22)
    truth = brute_force_logps(model, prompts, responses, "mean")
    assert_close(cross_pair_logps(model, prompts, responses, batch_size=3), truth, atol=1e-5, rtol=1e-5)
    assert_close(cross_pair_logps(model, prompts, responses, share_prefix=False), truth, atol=1e-5, rtol=1e-5)


def test_paired_logps_is_the_diagonal():
    model = tiny_llama()
    prompts, responses = random_lists(3, 2, 5, 3), random_lists(3, 1, 4, 4)
    Q = cross_pair_logps(model, prompts, responses)
    assert_close(paired_logps(model, prompts, responses, batch_size=2), Q.diagonal(), atol=1e-5, rtol=1e-5)


def test_logits_path_model_matches_fused_path():
    model = tiny_llama()
    prompts, responses = random_lists(3, 1, 5, 5), random_lists(3, 1, 5, 6)
    fused = cross_pair_logps(model, prompts, responses)
    logits_path = cross_pair_logps(NoKeepLM(model), prompts, responses)
    logits_path_pp = cross_pair_logps(NoKeepLM(model), prompts, responses, share_prefix=False)
    assert_close(logits_path, fused, atol=1e-5, rtol=1e-5)
    assert_close(logits_path_pp, fused, atol=1e-5, rtol=1e-5)


def test_scoring_keeps_train_mode_and_no_grad():
    model = tiny_llama().train()
    Q = cross_pair_logps(model, random_lists(2, 1, 3, 7), random_lists(2, 1, 3, 8))
    assert model.training and not Q.requires_grad


# ----------------------------------------------------------------------------- rewards


def parity_reward(prompts, responses):
    """Fraction of response tokens with the parity of the prompt's first token."""
    return [float(((y % 2) == (x[0] % 2)).float().mean()) for x, y in zip(prompts, responses)]


def test_cross_pair_rewards_callable():
    prompts, responses = random_lists(4, 1, 4, 9), random_lists(4, 1, 4, 10)
    R = cross_pair_rewards(parity_reward, prompts, responses, batch_size=3)
    expected = torch.tensor([[parity_reward([x], [y])[0] for y in responses] for x in prompts])
    assert R.shape == (4, 4) and R.dtype == torch.float32
    assert torch.equal(R, expected)
    assert torch.equal(paired_rewards(parity_reward, prompts, responses), expected.diagonal())


@pytest.mark.parametrize("pad_token_id", [0, None])
def test_cross_pair_rewards_sequence_classifier(pad_token_id):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=pad_token_id,
    )
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    # avoid the pad id inside sequences: HF picks the last non-pad token as the score position
    prompts = [x.clamp(min=1) for x in random_lists(3, 1, 5, 11)]
    responses = [y.clamp(min=1) for y in random_lists(3, 1, 5, 12)]
    R = cross_pair_rewards(rm, prompts, responses)
    with torch.no_grad():
        expected = torch.tensor([[rm(torch.cat([x, y])[None]).logits[0, 0].item() for y in responses] for x in prompts])
    assert_close(R, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_argument():
    model = tiny_llama()
    x, y = random_lists(2, 1, 3, 13), random_lists(2, 1, 3, 14)
    with pytest.raises(ValueError, match=r"responses\[1\] is empty"):
        cross_pair_logps(model, x, [y[0], torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        cross_pair_logps(model, [torch.tensor([], dtype=torch.long), x[1]], y)
    with pytest.raises(ValueError, match=r"responses\[0\] is empty"):
        cross_pair_rewards(parity_reward, x, [torch.tensor([], dtype=torch.long), y[1]])
    with pytest.raises(ValueError, match=r"len\(prompts\)=2 and len\(responses\)=1"):
        paired_logps(model, x, y[:1])
    with pytest.raises(ValueError, match=r"len\(prompts\)=2 and len\(responses\)=1"):
        cross_pair_logps(model, x, y[:1])
    with pytest.raises(ValueError, match=r"len\(prompts\)=1 and len\(responses\)=2"):
        cross_pair_rewards(parity_reward, x[:1], y)
    with pytest.raises(ValueError, match=r"len\(prompts\)=1 and len\(responses\)=2"):
        paired_rewards(parity_reward, x[:1], y)
    with pytest.raises(ValueError, match="prompts must be a non-empty list"):
        cross_pair_logps(model, [], y)
    with pytest.raises(TypeError, match="responses must be a list"):
        cross_pair_logps(model, x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"responses\[0\] must be 1-D"):
        cross_pair_logps(model, x, [torch.zeros(1, 3, dtype=torch.long), y[1]])
    with pytest.raises(TypeError, match=r"prompts\[1\] must hold integer token ids"):
        cross_pair_logps(model, [x[0], x[1].float()], y)
    with pytest.raises(ValueError, match=r"responses\[1\] has token id 40 outside \[0, vocab_size\)"):
        cross_pair_logps(model, x, [y[0], torch.tensor([3, V])])
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_pair_logps(model, x, y, reduction="none")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        cross_pair_logps(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="one score per"):
        cross_pair_rewards(lambda p, r: [0.0], x, y)
    with pytest.raises(ValueError, match="non-finite score"):
        cross_pair_rewards(lambda p, r: [float("nan")] * len(p), x, y)
    with pytest.raises(TypeError, match="reward must be"):
        cross_pair_rewards("not a reward", x, y)


def test_reward_model_must_have_one_label():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_labels=2, pad_token_id=0)
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    with pytest.raises(ValueError, match="num_labels=1"):
        cross_pair_rewards(rm, random_lists(2, 1, 3, 15), random_lists(2, 1, 3, 16))


# ----------------------------------------------------------------------------- data


def test_make_groups_seeded_partition():
    g1 = make_groups(23, 4, seed=3)
    assert g1 == make_groups(23, 4, seed=3)
    assert g1 != make_groups(23, 4, seed=4)
    assert len(g1) == 5 and all(len(g) == 4 for g in g1)
    flat = [k for g in g1 for k in g]
    assert len(set(flat)) == 20 and all(0 <= k < 23 for k in flat)
    assert sum(len(g) for g in make_groups(23, 4, drop_last=False)) == 23
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        make_groups(8, 0)
    with pytest.raises(ValueError, match="num_examples must be"):
        make_groups(3, 4)


def test_group_shuffle_sampler_whole_groups_per_epoch():
    s = GroupShuffleSampler(10, seed=1)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    s.set_epoch(0)
    assert list(s) == e0


def test_dataset_build_cache_and_items(tmp_path, monkeypatch):
    model = tiny_llama()
    prompts, responses = random_lists(10, 1, 4, 17), random_lists(10, 1, 4, 18)
    ds = VARDataset.build(prompts, responses, ref_model=model, reward=parity_reward, group_size=4, seed=0,
                          cache_dir=tmp_path)
    assert len(ds) == 2 and ds.rewards.shape == (2, 4, 4) and ds.ref_logps.shape == (2, 4, 4)
    idx = ds.groups[1]
    xs, ys = [prompts[k] for k in idx], [responses[k] for k in idx]
    assert_close(ds.ref_logps[1], cross_pair_logps(model, xs, ys), atol=1e-6)
    assert torch.equal(ds.rewards[1], cross_pair_rewards(parity_reward, xs, ys))
    item = ds[1]
    for r, k in enumerate(idx):
        P, L = len(prompts[k]), len(responses[k])
        assert torch.equal(item["input_ids"][r, : P + L], torch.cat([prompts[k], responses[k]]))
        assert item["attention_mask"][r].sum() == P + L
        assert torch.equal(item["labels"][r, P : P + L], responses[k])
        assert (item["labels"][r, :P] == -100).all() and (item["labels"][r, P + L :] == -100).all()
    assert len(list(tmp_path.glob("var-scores-*.pt"))) == 1

    # a second build with the same data, model and reward reads the cache: no scoring at all
    import varkernels.training.scoring as scoring_mod

    def fail(*a, **k):
        raise AssertionError("scored again despite the cache")

    monkeypatch.setattr(scoring_mod, "score_groups", fail)
    ds2 = VARDataset.build(prompts, responses, ref_model=model, reward=parity_reward, group_size=4, seed=0,
                           cache_dir=tmp_path)
    assert torch.equal(ds2.ref_logps, ds.ref_logps) and ds2.groups == ds.groups
    # a changed model (or data, or options) misses the cache
    other = tiny_llama(seed=1)
    with pytest.raises(AssertionError, match="scored again"):
        VARDataset.build(prompts, responses, ref_model=other, reward=parity_reward, group_size=4, cache_dir=tmp_path)
    with pytest.raises(AssertionError, match="scored again"):
        VARDataset.build(prompts, responses, ref_model=model, reward=parity_reward, group_size=4, seed=1,
                         cache_dir=tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip_scores"])
def test_damaged_cache_is_scored_again(tmp_path, damage):
    """A truncated file (an interrupted copy) or changed scores (bit rot, a hand edit) is never loaded."""
    model = tiny_llama()
    prompts, responses = random_lists(8, 1, 4, 21), random_lists(8, 1, 4, 22)
    ds = VARDataset.build(prompts, responses, ref_model=model, reward=parity_reward, group_size=4, cache_dir=tmp_path)
    (path,) = tmp_path.glob("var-scores-*.pt")
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        blob = torch.load(path, weights_only=True)
        blob["rewards"][0, 0, 0] += 1.0
        torch.save(blob, path)
    calls = []

    def counting_reward(xs, ys):
        calls.append(len(xs))
        return parity_reward(xs, ys)

    with pytest.warns(UserWarning, match="not usable.*scoring again"):
        again = VARDataset.build(prompts, responses, ref_model=model, reward=counting_reward, group_size=4,
                                 cache_dir=tmp_path, reward_fingerprint=_fp_of(parity_reward))  # same key
    assert sum(calls) == 2 * 16  # both groups scored again
    assert torch.equal(again.rewards, ds.rewards)
    # the rewritten file is whole again: the next build reads it without scoring or warning
    calls.clear()
    VARDataset.build(prompts, responses, ref_model=model, reward=counting_reward, group_size=4, cache_dir=tmp_path,
                     reward_fingerprint=_fp_of(parity_reward))
    assert calls == []


def _fp_of(fn):
    from datasets.fingerprint import Hasher

    return Hasher.hash(fn)  # what build keys a reward by when no reward_fingerprint is given


def test_to_hf_dataset_and_collator_errors():
    datasets = pytest.importorskip("datasets")
    model = tiny_llama()
    prompts, responses = random_lists(8, 1, 4, 23), random_lists(8, 1, 4, 24)
    ds = VARDataset.build(prompts, responses, ref_model=model, reward=parity_reward, group_size=4)
    hf = ds.to_hf_dataset()
    assert isinstance(hf, datasets.Dataset) and len(hf) == len(ds)
    assert set(hf.column_names) == {"input_ids", "attention_mask", "labels", "rewards", "ref_logps"}
    for g in range(len(ds)):
        for name, value in ds[g].items():
            assert hf[g][name].dtype == value.dtype and torch.equal(hf[g][name], value), name
    collate = VARCollator()
    from_hf = collate([hf[0], hf[1]])
    for name, value in collate([ds[0], ds[1]]).items():
        assert torch.equal(from_hf[name], value), name
    # what remove_unused_columns=True leaves: the error names the missing columns and the setting
    pruned = {k: v for k, v in ds[0].items() if k in ("input_ids", "labels")}
    missing = r"no \['attention_mask', 'rewards', 'ref_logps'\] column.*remove_unused_columns=False"
    with pytest.raises(ValueError, match=missing):
        collate([pruned])


def test_dataset_shared_context_form():
    model = tiny_llama()
    prompts, responses = random_lists(8, 1, 4, 19), random_lists(8, 1, 4, 20)
    rewards = torch.linspace(0, 1, 8).tolist()
    ds = VARDataset.build(prompts, responses, ref_model=model, example_rewards=rewards, group_size=4)
    assert not ds.cross_pairs and ds.rewards.shape == (2, 4) and ds.ref_logps.shape == (2, 4)
    idx = ds.groups[0]
    assert torch.equal(ds.rewards[0], torch.tensor([rewards[k] for k in idx]))
    assert_close(ds.ref_logps[0], paired_logps(model, [prompts[k] for k in idx], [responses[k] for k in idx]),
                 atol=1e-6)
    batch = VARCollator()([ds[0], ds[1]])
    assert batch["rewards"].shape == (2, 4) and batch["input_ids"].shape[0] == 8
    with pytest.raises(ValueError, match="example_rewards must have one reward per example"):
        VARDataset.build(prompts, responses, ref_model=model, example_rewards=rewards[:5], group_size=4)
    with pytest.raises(ValueError, match="cross_pairs=True needs"):
        VARDataset.build(prompts, responses, ref_model=model, example_rewards=rewards, group_size=4, cross_pairs=True)
    with pytest.raises(ValueError, match="either reward or example_rewards"):
        VARDataset.build(prompts, responses, ref_model=model, reward=parity_reward, example_rewards=rewards)
    with pytest.raises(ValueError, match=r"len\(prompts\)=8 and len\(responses\)=7"):
        VARDataset.build(prompts, responses[:7], ref_model=model, example_rewards=rewards)
    for bad in (-1, 0):  # on main: scores read from memory never written (the scoring loop never ran)
        with pytest.raises(ValueError, match=f"batch_size must be a positive int or None, got {bad}"):
            VARDataset.build(prompts, responses, ref_model=model, example_rewards=rewards, batch_size=bad)


def test_dataset_rewards_shapes_follow_the_loss_rules():
    """Pre-scored rewards / ref_logps: the shape rules of the loss (check_pair_inputs) with the dataset's G and B."""
    prompts, responses = random_lists(8, 1, 4, 25), random_lists(8, 1, 4, 26)
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    for shape in ((2, 4, 4), (2, 4)):
        ds = VARDataset(prompts, responses, groups, torch.ones(shape, dtype=torch.int64), torch.zeros(shape))
        assert ds.rewards.dtype == ds.ref_logps.dtype == torch.float32 and ds.rewards.shape == shape
        assert ds.cross_pairs == (len(shape) == 3) and ds.group_size == 4
    context = r"G = 2 groups of B = 4 examples.*\[G, B, B\] = \(2, 4, 4\).*\[G, B\] = \(2, 4\)"
    bad = {
        (4, 4): r"rewards must have shape \[k, B, B\] or \[k, B\] with k = 2 groups, got \(4, 4\)",
        (2, 4, 3): r"rewards must have shape .*k\*B = 8.*got \(2, 4, 3\)",  # not square
        (2, 3, 3): r"rewards must have shape .*k\*B = 8.*got \(2, 3, 3\)",  # B is not the groups'
        (2, 5): r"rewards must have shape .*got \(2, 5\)",
    }
    for shape, pattern in bad.items():
        with pytest.raises(ValueError, match=pattern + ".*" + context):
            VARDataset(prompts, responses, groups, torch.zeros(shape), torch.zeros(shape))
    with pytest.raises(ValueError, match=r"rewards and ref_logps must have the same shape.*\(2, 4, 4\).*\(2, 4\)"):
        VARDataset(prompts, responses, groups, torch.zeros(2, 4, 4), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor, got list"):
        VARDataset(prompts, responses, groups, [[0.0] * 4] * 2, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"every group must have the same number B of examples, got group sizes \[3,"):
        VARDataset(prompts, responses, [[0, 1, 2, 3], [4, 5, 6]], torch.zeros(2, 4), torch.zeros(2, 4))


def test_group_size_and_batch_size_checks():
    from varkernels.training.groups import check_group_size

    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError, match=rf"group_size must be a positive int, got {bad!r}; a VAR group needs B"):
            check_group_size(bad)
        with pytest.raises(ValueError, match=rf"group_size must be a positive int, got {bad!r}$"):
            make_groups(8, bad)
    check_group_size(2)
    model, x, y = tiny_llama(), random_lists(2, 1, 3, 27), random_lists(2, 1, 3, 28)
    for bad in (0, 1.5, False):
        for fn, target in ((cross_pair_logps, model), (paired_logps, model), (cross_pair_rewards, parity_reward),
                           (paired_rewards, parity_reward)):
            with pytest.raises(ValueError, match=rf"batch_size must be a positive int or None, got {bad!r}"):
                fn(target, x, y, batch_size=bad)
    with pytest.raises(ValueError, match=r"reduction must be one of \['mean', 'sum'\], got 'none'"):
        paired_logps(model, x, y, reduction="none")
