"""docs/online.md opens with a quick start that runs as printed, and the quick starts of docs/trainer.md and
docs/online.md train quietly: no DeepSpeed notice, no pinned-memory warning, no deprecation warning about an
option varkernels sets."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from doc_blocks import quick_start as trainer_quick_start

ROOT = Path(__file__).resolve().parent.parent
ONLINE_MD = ROOT / "docs" / "online.md"


def quick_start() -> str:
    sections = re.split(r"^## ", ONLINE_MD.read_text(encoding="utf-8"), flags=re.M)
    assert sections[1].startswith("Quick start: prompts and a reward function"), sections[1][:80]
    blocks = re.findall(r"^```python\n(.*?)^```", sections[1], flags=re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]


def needs_the_train_extra():
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")


def test_quick_start_fits_on_one_screen():
    assert len(quick_start().splitlines()) <= 30


def test_the_grpo_sketch_says_it_is_illustrative():
    text = ONLINE_MD.read_text(encoding="utf-8")
    switching = re.split(r"^## ", text, flags=re.M)[2]
    assert switching.startswith("Switching from GRPO")
    assert "illustrative sketch, not runnable" in switching and "`accuracy`, `format_reward` and `prompts`" in switching


@pytest.mark.usefixtures("one_torch_thread")
def test_online_md_quick_start_runs(tmp_path, monkeypatch):
    needs_the_train_extra()
    monkeypatch.chdir(tmp_path)  # output_dir is a relative path
    namespace = {"__name__": "online_md_quick_start"}
    start = time.perf_counter()
    exec(compile(quick_start(), "docs/online.md quick start", "exec"), namespace)
    print(f"docs/online.md quick start: {time.perf_counter() - start:.2f} s")
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert (tmp_path / "online-var-quickstart" / "model.safetensors").exists()
    log = trainer.state.log_history[0]
    assert {"loss", "reward", "reward_std", "var/weights_max", "var/ess"} <= set(log)
    assert 1.0 <= log["var/ess"] <= 4.0 and log["var/weights_max"] <= 4.0  # G = num_generations = 4
    fn = namespace["echoes_prompt"]  # the reward function of the texts, TRL's signature
    assert fn(["w3 w1"], ["w3 w5 w3"], completion_ids=[[5, 7, 5]]) == [0.25]


# Runs both quick starts in a fresh process (DeepSpeed logs its notice once, when it is first imported, and an
# earlier test of this process may have imported it), with every warning recorded.
QUIET_SCRIPT = textwrap.dedent('''
    import json, os, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("trainer_md", "online_md"):
            os.makedirs(name)
            os.chdir(name)
            with open(f"../{name}.py") as f:
                code = f.read()
            exec(compile(code, f"{name} quick start", "exec"), {"__name__": name})
            os.chdir("..")
    with open("warnings.json", "w") as f:
        json.dump([[w.category.__name__, str(w.message), w.filename] for w in caught], f)
''')


def config_options() -> set:
    """The options of VARConfig and OnlineVARConfig (theirs, GRPOConfig's and TrainingArguments'): the quick starts
    set none that is deprecated, so a deprecation warning naming one comes from a default varkernels sets."""
    from varkernels.training import VARConfig
    from varkernels.training.online import OnlineVARConfig

    return {f.name for config in (VARConfig, OnlineVARConfig) for f in dataclasses.fields(config)}


@pytest.mark.usefixtures("one_torch_thread")
def test_quick_starts_are_quiet(tmp_path):
    needs_the_train_extra()
    (tmp_path / "trainer_md.py").write_text(trainer_quick_start())
    (tmp_path / "online_md.py").write_text(quick_start())
    (tmp_path / "run.py").write_text(QUIET_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-W", "default", "run.py"], cwd=tmp_path, env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "Setting accelerator to CPU" not in output and "[real_accelerator" not in output
    assert "pin_memory" not in output
    caught = json.loads((tmp_path / "warnings.json").read_text())
    options = config_options()
    ours = []
    for category, message, filename in caught:
        deprecated = re.match(r"`(\w+)` is deprecated", message)
        from_varkernels = str(ROOT / "varkernels") in filename
        if category in ("FutureWarning", "DeprecationWarning") and (deprecated and deprecated[1] in options
                                                                    or from_varkernels):
            ours.append((category, message, filename))
    assert not ours, ours
    others = sorted({(c, m.splitlines()[0][:160]) for c, m, _ in caught})
    print("warnings not from options varkernels sets:", *others, sep="\n  ")
