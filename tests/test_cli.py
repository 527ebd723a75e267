"""varkernels-train: a model path, a jsonl dataset, rewards as module:function and a reward-model path, --config."""

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
yaml = pytest.importorskip("yaml")

from tiny_text import brute_force_logp, count_topic, llama, reward_model_and_tokenizer, rows, tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REWARD_MODULE = '''
def count_topic(prompts, completions, topic, **kwargs):
    return [float(c.split().count(t)) for c, t in zip(completions, topic)]
'''


def test_cli_trains_from_jsonl_with_a_yaml_config(tmp_path, monkeypatch):
    from varkernels.training import cli

    data = rows(8, seed=20)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    policy, tok = llama(seed=4), tokenizer()
    policy.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    rm, rm_tok = reward_model_and_tokenizer()
    rm.save_pretrained(tmp_path / "rm")
    rm_tok.save_pretrained(tmp_path / "rm")
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)  # module:function imports from the working directory
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    config = {
        "model_name_or_path": str(tmp_path / "policy"), "dataset_name": str(tmp_path / "train.jsonl"),
        "reward_funcs": ["my_rewards:count_topic", str(tmp_path / "rm")], "reward_weights": [1.0, 0.5],
        "output_dir": str(tmp_path / "out"), "group_size": 4, "per_device_train_batch_size": 1,
        "learning_rate": 1e-2, "report_to": "none", "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
        "logging_steps": 1, "max_steps": 5,
    }
    (tmp_path / "var.yaml").write_text(yaml.safe_dump(config))
    trainer = cli.run(["--config", str(tmp_path / "var.yaml"), "--max_steps", "2"])  # the flag overrides the file
    assert trainer.state.global_step == 2 and trainer.args.group_size == 4

    ds = trainer.train_dataset
    initial = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    for g, idx in enumerate(ds.groups):
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                ids = rm_tok(data[i]["prompt"] + data[j]["completion"], add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    r_model = rm(torch.tensor([ids])).logits[0, 0].item()
                r_fn = count_topic([], [data[j]["completion"]], topic=[data[i]["topic"]])[0]
                assert abs(ds.rewards[g, a, b].item() - (r_fn + 0.5 * r_model)) < 1e-5
                q = brute_force_logp(initial, ds.examples.prompts[i], ds.examples.completions[j])
                assert abs(ds.ref_logps[g, a, b].item() - q) < 1e-5
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    moved = max((p - initial.state_dict()[n]).abs().max().item() for n, p in saved.state_dict().items())
    assert moved > 1e-4


CONSOLE_SCRIPT = "import sys; from varkernels.training.cli import main; sys.exit(main())"  # what pip generates


def test_console_script_exits_0_after_training(tmp_path):
    """varkernels-train in a fresh process, as the console script runs it: it trains, logs its loss (logging_steps
    defaults to 10), saves, prints where, exits 0; without --use_cpu, and quiet on a machine without a GPU (no
    pin_memory warning, no DeepSpeed notice)."""
    import os
    import subprocess

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(8, seed=21)))
    llama(seed=5).save_pretrained(tmp_path / "policy")
    tokenizer().save_pretrained(tmp_path / "policy")
    (tmp_path / "rewards.py").write_text(REWARD_MODULE)
    argv = ["--model_name_or_path", "policy", "--dataset_name", "train.jsonl", "--reward_funcs",
            "rewards.py:count_topic", "--output_dir", "out", "--group_size", "4", "--max_steps", "10",
            "--per_device_train_batch_size", "1", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, *argv], cwd=tmp_path, env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").exists() and list((tmp_path / "out" / "var_scores").glob("*.pt"))
    assert [line for line in done.stdout.splitlines() if line.startswith("{'loss'")], done.stdout  # step 10's log
    assert f"varkernels-train: saved the trained model to {tmp_path / 'out'}" in done.stdout.splitlines()
    assert "pin_memory" not in done.stderr and "Setting accelerator to CPU" not in done.stdout + done.stderr


def test_cli_errors_and_the_console_script():
    from varkernels.training import cli

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        cli.load_text_dataset("missing.jsonl")
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        cli.resolve_reward("json:nope")
    assert cli.resolve_reward("path/to/reward_model") == "path/to/reward_model"
    with pytest.raises(SystemExit):  # argparse: the model and the dataset are required
        cli.run(["--output_dir", "out"])
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'varkernels-train = "varkernels.training.cli:main"' in pyproject
