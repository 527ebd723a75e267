"""Tiny text fixtures for the trainer tests: a word-level tokenizer with a chat template and a tiny Llama."""

from __future__ import annotations

import torch

WORDS = ["<pad>", "<eos>", "<bos>", "<unk>", "user:", "assistant:"] + [f"w{i}" for i in range(26)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tokenizer(words=WORDS, bos=True, pad=True):
    """WordLevel over ``words`` wrapped in PreTrainedTokenizerFast, with a hand-set chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                  pad_token="<pad>" if pad else None)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(seed=0, vocab_size=None):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size or len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
        bos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 26, (k,), generator=g))

    return [{"prompt": words(int(torch.randint(1, 4, (1,), generator=g))),
             "completion": words(int(torch.randint(1, 5, (1,), generator=g))), "topic": f"w{r % 3}"}
            for r in range(n)]


def count_topic(prompts, completions, topic, **kwargs):
    """Reward on text: how often the row's topic word occurs in the completion (a TRL-style function)."""
    return [float(c.split().count(t)) for c, t in zip(completions, topic)]


def brute_force_logp(model, prompt_ids, completion_ids):
    """mean log π(y | x) from one plain forward of x ⊕ y (float64 log-softmax)."""
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids])[None]).logits[0].double()
    lp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1).gather(-1, completion_ids[:, None])
    return float(lp.mean())


def reward_model_and_tokenizer(pad_token_id=None):
    """A reward model over another vocabulary (the words reversed, two more) without a pad_token_id."""
    import transformers

    words = ["<unk>", "<eos>", "<bos>", "<pad>", "x", "y"] + [f"w{i}" for i in reversed(range(26))]
    tok = tokenizer(words, bos=False, pad=False)
    torch.manual_seed(5)
    cfg = transformers.LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                                   pad_token_id=pad_token_id)
    return transformers.LlamaForSequenceClassification(cfg).eval(), tok
