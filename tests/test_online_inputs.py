"""OnlineVARTrainer's checks of its inputs (issue 26, items 2 and 4): every form of reward output TRL reads
(lists, numpy arrays, tensors, None) is checked alike, naming the function, the completion's index and its
text; the dataset is checked when the trainer is made, before any generation, naming the column or the row;
the weights stay finite at the smallest var_beta the config takes.
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
datasets = pytest.importorskip("datasets")
np = pytest.importorskip("numpy")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _toy import MAX_NEW, Language, tiny_llama  # noqa: E402
from compare_methods import toy_text, toy_tokenizer  # noqa: E402

from varkernels.training.online import OnlineVARConfig, OnlineVARTrainer, online_var_weights  # noqa: E402
from varkernels.training.rewards import as_scores  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
G = 4
SMALLEST_BETA = 1.2e-38  # just above the smallest var_beta OnlineVARConfig takes (a normal float32)


@pytest.fixture(scope="module")
def toy():
    """(tokenizer, prompts as text): an untrained policy samples well enough to exercise the checks."""
    tok, names = toy_tokenizer()
    return tok, [toy_text(names, x) for x in Language(0).prompts(16)]


def make(toy, tmp_path, reward, train_dataset=None, trainer_kw=(), **kw):
    tok, prompts = toy
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                max_completion_length=MAX_NEW, max_steps=1, learning_rate=1e-3, report_to=[], use_cpu=True,
                save_strategy="no", disable_tqdm=True, bf16=False, var_beta=0.2, seed=0, var_reference="policy")
    ds = datasets.Dataset.from_dict({"prompt": prompts}) if train_dataset is None else train_dataset
    return OnlineVARTrainer(model=tiny_llama(), reward_funcs=reward, args=OnlineVARConfig(**{**base, **kw}),
                            train_dataset=ds, processing_class=tok, **dict(trainer_kw))


def constant(prompts, completions, **kw):
    return [0.5] * len(completions)


# ----------------------------------------------------------------------------- reward outputs


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1e39])
@pytest.mark.parametrize("form", ["numpy", "tensor"])
def test_non_finite_reward_in_an_array_raises_naming_function_and_completion(toy, tmp_path, form, bad):
    """On main a list raised, but an array's NaN / -inf was taken as unscorable and +inf gave 'weights must be
    finite' from the loss; -1e39 is -inf in the float32 the rewards are kept in (a float64 array's value)."""
    seen = []

    def arr_reward(prompts, completions, **kw):
        seen.append(list(completions))
        r = [bad if j == 3 else 0.5 for j in range(len(completions))]
        return np.array(r) if form == "numpy" else torch.tensor(r, dtype=torch.float64)

    trainer = make(toy, tmp_path, arr_reward)
    want = f"reward function 'arr_reward' returned a non-finite score {bad!r} for completion 3 of the batch"
    with pytest.raises(ValueError, match=re.escape(want)) as e:
        trainer.train()
    assert repr(seen[0][3])[:200] in str(e.value)  # the completion's text


@pytest.mark.parametrize("output, error, match", [
    (lambda n: ["0.5"] * n, TypeError, r"reward function 'bad_type' returned str '0.5' for completion 0 of the batch "
                                       r"\('.*'\); expected a real number"),
    (lambda n: 0.5, TypeError, r"reward function 'bad_type' must return a list of floats .* got float"),
    (lambda n: torch.tensor(0.5), ValueError, r"reward function 'bad_type' returned 1 rewards for 8"),
    (lambda n: {"score": 0.5}, TypeError, r"reward function 'bad_type' must return a list of floats .* got dict"),
], ids=["strings", "scalar", "0-d tensor", "dict"])
def test_reward_of_the_wrong_type_raises_naming_the_function(toy, tmp_path, output, error, match):
    """On main: TRL's raw conversion errors ('too many dimensions 'str'', ''float' object is not iterable')."""
    def bad_type(prompts, completions, **kw):
        return output(len(completions))

    with pytest.raises(error, match=match):
        make(toy, tmp_path, bad_type).train()


def test_forms_trl_reads_are_read_alike():
    """bools are 0 / 1 (TRL reads them so; main's as_scores refused them), numpy and one-element tensor entries
    their values, None NaN (unscorable), in lists, numpy arrays (object arrays hold None) and tensors."""
    want = torch.tensor([1.0, 0.0, 0.25, math.nan])
    for out in ([True, False, 0.25, None], [np.bool_(True), np.float32(0.0), torch.tensor([0.25]), None],
                np.array([True, False, 0.25, None], dtype=object)):
        torch.testing.assert_close(as_scores(out, 4, name="f"), want, equal_nan=True)
    torch.testing.assert_close(as_scores(torch.tensor([[1.0], [0.0]]), 2, name="f"), torch.tensor([1.0, 0.0]))


# ----------------------------------------------------------------------------- weights at the smallest var_beta


def test_weights_at_the_smallest_var_beta_are_finite():
    """r/β overflowed float32 on main (NaN weights); shifted by the group's best reward, the best takes the
    group's n scorable weight (ties split by q), the rest 0, the unscorable 0."""
    rewards = torch.tensor([5.0, 7.0, 6.0, 7.0, 1.0, math.nan, 0.0, 1.0])
    valid = ~torch.isnan(rewards)
    q = torch.tensor([0.0, 0.5, 0.0, -0.5, 0.0, 0.0, 0.0, 0.0])
    w = online_var_weights(rewards, G, SMALLEST_BETA, q=q, valid=valid)
    s = 1 / (1 + math.exp(-1.0))  # softmax([0.5, -0.5])[0]
    torch.testing.assert_close(w, torch.tensor([0.0, G * s, 0.0, G * (1 - s), 1.5, 0.0, 0.0, 1.5]))


def test_trainer_at_the_smallest_var_beta_trains_on_finite_weights(toy, tmp_path):
    """On main: 'weights must be finite' from the loss (rewards 4..7 over 1.2e-38 overflow float32)."""
    def ranks(prompts, completions, **kw):
        return [float(j) for j in range(len(completions))]

    trainer = make(toy, tmp_path, ranks, var_beta=SMALLEST_BETA)
    batches, inner = [], trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: batches.append(inner(inputs)) or batches[-1]
    loss = trainer.train().training_loss
    torch.testing.assert_close(batches[0]["var_weights"], torch.tensor([0.0, 0, 0, G] * 2))
    assert math.isfinite(loss) and loss != 0



def test_non_finite_log_ratio_raises_naming_q(toy, tmp_path):
    """A reference model that gives NaN log-probabilities (here: a NaN in its output embedding): the error names
    q and the completion, before any loss; on main: 'weights must be finite' from the loss, naming neither."""
    trainer = make(toy, tmp_path, constant, var_reference="initial")
    with torch.no_grad():
        trainer.accelerator.unwrap_model(trainer.ref_model).get_output_embeddings().weight[:, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"q = .* of completion 0 of the generation batch is nan"):
        trainer.train()


# ----------------------------------------------------------------------------- the dataset


def _rows(prompts, i, value):
    return prompts[:i] + [value] + prompts[i + 1:]


@pytest.mark.parametrize("make_ds, match", [
    (lambda p: {"text": p}, r"train_dataset must have rows and a 'prompt' column .* got 16 rows, columns \['text'\]"),
    (lambda p: {"prompt": []}, r"train_dataset must have rows and a 'prompt' column .* got 0 rows, columns"),
    (lambda p: {"prompt": [""] * len(p)}, r"train_dataset row 0: 'prompt' must be a non-blank string .* got str ''"),
    (lambda p: {"prompt": _rows(p, 5, "  ")}, r"train_dataset row 5: .* got str '  '"),
    (lambda p: {"prompt": _rows(p, 5, None)}, r"train_dataset row 5: .* got NoneType None"),
    (lambda p: {"prompt": list(range(len(p)))}, r"train_dataset row 0: .* got int 0"),
    (lambda p: {"prompt": _rows([[{"role": "user", "content": x}] for x in p], 3, [])},
     r"train_dataset row 3: .* non-empty list of chat messages .* got list \[\]"),
], ids=["no prompt column", "no rows", "all empty", "blank row", "None row", "ints", "empty conversation"])
def test_bad_dataset_raises_when_the_trainer_is_made(toy, tmp_path, make_ds, match):
    """On main the trainer was made: a missing column gave KeyError 'prompt' and empty prompts IndexError in
    the first generation, int prompts a tokenizer error without the row; None and blank prompts and an empty
    dataset trained (0 steps for the empty one) without a word."""
    with pytest.raises(ValueError, match=match):
        make(toy, tmp_path, constant, datasets.Dataset.from_dict(make_ds(toy[1])))


def test_bad_eval_dataset_is_named_with_its_key(toy, tmp_path):
    """Also eval_dataset, each dataset of a dict; conversations pass. On main: made, eval never run here."""
    chats = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": x}] for x in toy[1]]})
    make(toy, tmp_path, constant, chats, trainer_kw=dict(eval_dataset={"chat": chats}))
    text = datasets.Dataset.from_dict({"text": toy[1]})
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\] must have rows and a 'prompt' column"):
        make(toy, tmp_path, constant, trainer_kw=dict(eval_dataset={"chat": chats, "held_out": text}))
