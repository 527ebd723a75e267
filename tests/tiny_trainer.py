"""The tiny Llama and cross-pair dataset of the trainer tests (tests/test_trainer.py, test_distributed.py,
test_text_trainer.py, test_trl.py): integer tokens over a vocabulary of V, a parity reward, VARDataset.build."""

import torch
import transformers

from varkernels.training.data import VARDataset

V = 40


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def parity_reward(prompts, responses):
    return [float(((y % 2) == (x[0] % 2)).float().mean()) for x, y in zip(prompts, responses)]


def make_dataset(n=8, group_size=4, seed=0, cross_pairs=True, ref=None):
    g = torch.Generator().manual_seed(100 + seed)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(0, V, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g) for _ in range(n)]
    ref = ref if ref is not None else tiny_llama(seed=7).eval()
    if cross_pairs:
        return VARDataset.build(prompts, responses, ref_model=ref, reward=parity_reward, group_size=group_size)
    rewards = parity_reward(prompts, responses)
    return VARDataset.build(prompts, responses, ref_model=ref, example_rewards=rewards, group_size=group_size)


def assert_close(actual, expected, atol=1e-6, rtol=1e-5, name=""):
    err = (actual.double() - expected.double()).abs()
    tol = atol + rtol * expected.double().abs()
    worst = int(err.argmax())
    assert bool((err <= tol).all()), f"{name}: max abs err {err.max().item():.3g} at flat index {worst}"
