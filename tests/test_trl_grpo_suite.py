"""TRL's own GRPOTrainer tests run against OnlineVARTrainer (tools/trl_grpo_tests.py, docs/online.md section
"TRL's GRPOTrainer tests"): the slow run needs a TRL checkout's tests/ folder in $TRL_TESTS; the pieces of the
runner (stand-ins in the Hub cache layout, the zen dataset, the comparison) are checked without it."""

import os
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
from tools import trl_grpo_tests as suite  # noqa: E402


def test_stand_in_loads_from_the_hub_cache_layout(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_id, vlm = ("trl-internal-testing/tiny-LlamaForSequenceClassification-3.2",
                     "trl-internal-testing/tiny-Gemma3ForConditionalGeneration")
    done = suite.build_cache(tmp_path, f'x = "{model_id}"\ny = "{vlm}"')
    assert done["built"] == [model_id] and done["not_built"] == [vlm]  # a VLM: not built, its tests skip
    tok = AutoTokenizer.from_pretrained(model_id, cache_dir=tmp_path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_id, cache_dir=tmp_path, local_files_only=True)
    assert model.config.num_labels == 1 and model.config.num_hidden_layers == 2
    assert type(model).__name__ == "LlamaForSequenceClassification"
    tok.pad_token = "<|finetune_right_pad_id|>"  # TRL's test sets it: it must be a token of the vocabulary
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|finetune_right_pad_id|>") != tok.unk_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Flat is better than"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok("Flat is better than nested.")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Flat is better than nested."


def test_qwen_stand_in_keeps_qwens_special_token_ids():
    tok = suite.family_tokenizer("Qwen2ForCausalLM")  # TRL's tests hard-code <|im_end|> = 151645
    assert (tok.pad_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<tool_call>")) == (151643, 151645, 151657)


def test_zen_dataset_formats():
    data = suite.zen("standard_prompt_only")
    assert (len(data["train"]), len(data["test"])) == (17, 2)
    assert data["train"][0] == {"prompt": "Beautiful is better than"}
    conv = suite.zen("conversational_prompt_only")["train"][0]["prompt"]
    assert conv[0]["role"] == "user" and "Beautiful is better than" in conv[0]["content"]
    with pytest.raises(LookupError, match="standard_preference"):
        suite.zen("standard_preference")


def test_compare_counts_only_regressions_outside_the_by_design_list():
    grpo = {t: {"outcome": "passed", "reason": ""} for t in
            ["T::test_a", "T::test_b[x]", "T::test_training_beta_non_zero", "T::test_c"]}
    grpo["T::test_d"] = {"outcome": "failed", "reason": "AttributeError"}
    var = {t: dict(r) for t, r in grpo.items()}
    var["T::test_b[x]"] = {"outcome": "failed", "reason": "TypeError: boom"}
    var["T::test_training_beta_non_zero"] = {"outcome": "failed", "reason": "ValueError: beta"}
    var["T::test_d"] = {"outcome": "passed", "reason": ""}  # better than GRPO: listed, not a regression
    lines, regressions = suite.compare(grpo, var)
    assert regressions == ["T::test_b[x]"]
    assert len(lines) == 3 and any("by design" in line for line in lines)


FAKE_TRL_TESTS = {
    "testing_utils.py": """
import pytest


class TrlTestCase:
    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)
""",
    "test_grpo_trainer.py": """
from datasets import load_dataset
from trl import GRPOConfig, GRPOTrainer

from .testing_utils import TrlTestCase


class TestGRPOTrainer(TrlTestCase):
    def test_zen(self):
        assert len(load_dataset("trl-internal-testing/zen", "standard_prompt_only", split="train")) == 17

    def test_trainer_is_grpo(self):
        assert GRPOTrainer.__name__ == "GRPOTrainer"

    def test_training_beta_non_zero(self):
        assert GRPOConfig(output_dir=self.tmp_dir, beta=0.1).use_cpu  # no GPU here: the runner sets use_cpu

    def test_needs_a_vlm(self):
        from transformers import AutoConfig

        AutoConfig.from_pretrained("trl-internal-testing/tiny-Qwen2VLForConditionalGeneration")
""",
}


@pytest.mark.slow
def test_runner_swaps_the_trainer_and_tells_regressions_from_by_design(tmp_path):
    """The whole runner on a stand-in for TRL's tests folder (two pytest processes, about a minute)."""
    trl_tests = tmp_path / "trl_tests"
    trl_tests.mkdir()
    for name, text in FAKE_TRL_TESTS.items():
        (trl_tests / name).write_text(text)
    rc = suite.main([str(trl_tests), "--out", str(tmp_path / "out")])
    rows = {}
    for trainer in ("grpo", "onlinevar"):
        for line in (tmp_path / "out" / f"{trainer}.txt").read_text().splitlines()[1:]:
            outcome, test, reason = line.split("\t")
            rows[trainer, test.split("::")[-1]] = outcome, reason
    assert rows["grpo", "test_trainer_is_grpo"][0] == "passed"
    assert rows["onlinevar", "test_trainer_is_grpo"][0] == "failed"  # the swap took place
    assert rows["grpo", "test_zen"][0] == rows["onlinevar", "test_zen"][0] == "passed"
    assert rows["onlinevar", "test_training_beta_non_zero"][0] == "failed"
    assert rows["grpo", "test_training_beta_non_zero"][0] == "passed"
    for trainer in ("grpo", "onlinevar"):
        outcome, reason = rows[trainer, "test_needs_a_vlm"]
        assert outcome == "skipped" and "tiny-Qwen2VLForConditionalGeneration" in reason
    diff = (tmp_path / "out" / "diff.txt").read_text()
    assert "1 pass with GRPOTrainer and fail with OnlineVARTrainer outside the by-design list" in diff, diff
    assert "test_training_beta_non_zero\tgrpo=passed\tonlinevar=failed\tby design: beta" in diff
    assert rc == 1  # test_trainer_is_grpo: a regression outside the by-design list


@pytest.mark.slow
def test_onlinevar_passes_trl_grpo_tests_wherever_grpo_does(tmp_path):
    trl_tests = os.environ.get("TRL_TESTS")
    if not trl_tests:
        pytest.skip("TRL_TESTS is not set: point it at the tests/ folder of a TRL v1.16.0 checkout "
                    "(docs/online.md, \"TRL's GRPOTrainer tests\")")
    rc = suite.main([trl_tests, "--out", str(tmp_path)])
    diff = (tmp_path / "diff.txt").read_text()
    grpo = (tmp_path / "grpo.txt").read_text()
    assert " passed" in grpo.splitlines()[0], grpo  # the stand-ins work: GRPOTrainer passes tests here
    assert rc == 0, diff
    assert Path(tmp_path / "onlinevar.txt").exists()
