"""Checkpoints cut short (varkernels.training.trainer.CompleteCheckpoints, in VARTrainer and OnlineVARTrainer).

A process killed while saving checkpoint-N leaves a folder without trainer_state.json (Trainer writes it last);
``resume_from_checkpoint=True`` must then take the newest complete checkpoint, say so, and the logged num_tokens
must go on from that checkpoint's count:
- the save stopped at each stage (weights only, optimizer written, trainer_state.json half written), both trainers;
- a save into a folder that already held a complete checkpoint, stopped halfway, does not look complete;
- nothing complete: a clear error naming output_dir and the folders skipped;
- a real SIGKILL of a training subprocess in the middle of a save, then a resume in this process.
"""

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl", reason="OnlineVARTrainer subclasses TRL's GRPOTrainer (the train extra)")
datasets = pytest.importorskip("datasets")

from tiny_trainer import make_dataset, tiny_llama  # noqa: E402
from transformers import Trainer  # noqa: E402
from transformers.trainer_callback import TrainerState  # noqa: E402

from varkernels.training.online import OnlineVARConfig, OnlineVARTrainer  # noqa: E402
from varkernels.training.trainer import VARConfig, VARTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from _toy import MAX_NEW, Language  # noqa: E402
from _toy import tiny_llama as toy_llama  # noqa: E402
from compare_methods import toy_text, toy_tokenizer, trl_reward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOGGER = "varkernels.training.trainer"


@pytest.fixture(scope="module")
def var_data():
    return make_dataset(n=8, group_size=4)


def var_trainer(out, max_steps, data):
    args = VARConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=1, logging_steps=1,
                     save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return VARTrainer(model=tiny_llama(), args=args, train_dataset=data)


def online_trainer(out, max_steps, data=None):
    tok, names = toy_tokenizer()
    prompts = datasets.Dataset.from_dict({"prompt": [toy_text(names, x) for x in Language(0).prompts(8)]})
    args = OnlineVARConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, num_generations=2,
                           max_completion_length=MAX_NEW, logging_steps=1, save_strategy="steps", save_steps=1,
                           report_to=[], use_cpu=True, disable_tqdm=True, seed=0, var_reference="policy",
                           activation_checkpointing=False)
    torch.manual_seed(0)
    return OnlineVARTrainer(model=toy_llama(), reward_funcs=trl_reward(names), args=args, train_dataset=prompts,
                            processing_class=tok)


TRAINERS = {"var": var_trainer, "online": online_trainer}


class Killed(BaseException):
    """Stands for the kill: nothing after the point where it is raised runs (no `except Exception` catches it)."""


def stop_saving_at(trainer, stage, monkeypatch, step=2):
    """Make the save of checkpoint-`step` stop at `stage`: "weights" (only the model written), "rng" (optimizer and
    scheduler written too) or "state" (trainer_state.json half written: a kill inside its write)."""
    if stage == "state":
        save = TrainerState.save_to_json

        def half_written(self, path):
            if self.global_step != step:
                return save(self, path)
            save(self, path)
            text = Path(path).read_text()
            Path(path).write_text(text[: len(text) // 2])
            raise Killed(stage)

        monkeypatch.setattr(TrainerState, "save_to_json", half_written)
        return
    name = {"weights": "_save_optimizer_and_scheduler", "rng": "_save_rng_state"}[stage]
    inner = getattr(trainer, name)

    def stop(*a, **k):
        if trainer.state.global_step == step:
            raise Killed(stage)
        return inner(*a, **k)

    setattr(trainer, name, stop)


def logged(trainer, key="num_tokens"):
    return {h["step"]: h[key] for h in trainer.state.log_history if "loss" in h}


def resumed_from(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "resuming from" in r.getMessage()]


@pytest.mark.parametrize("kind, stage", [("var", "weights"), ("var", "rng"), ("var", "state"),
                                         ("online", "weights"), ("online", "state")])
def test_resume_skips_a_checkpoint_cut_short(kind, stage, tmp_path, monkeypatch, caplog, var_data):
    """checkpoint-2's save stops at `stage`: resume_from_checkpoint=True takes checkpoint-1, warns that checkpoint-2
    was skipped, trains steps 2 and 3, and num_tokens goes on from checkpoint-1's count (main: FileNotFoundError
    trainer_state.json, or for "state" a JSONDecodeError, from checkpoint-2)."""
    make = TRAINERS[kind]
    first = make(tmp_path, 3, var_data)
    stop_saving_at(first, stage, monkeypatch)
    with pytest.raises(Killed):
        first.train()
    monkeypatch.undo()
    ckpt2 = tmp_path / "checkpoint-2"
    assert ckpt2.is_dir() and any(ckpt2.glob("model*.safetensors"))  # the cut-short save wrote the weights
    assert (ckpt2 / "optimizer.pt").exists() == (stage != "weights")
    at_ckpt1 = TrainerState.load_from_json(str(tmp_path / "checkpoint-1" / "trainer_state.json"))
    assert at_ckpt1.num_input_tokens_seen > 0
    uninterrupted = logged(first)  # step 2 was trained and logged before its save was cut short

    again = make(tmp_path, 3, var_data)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again.train(resume_from_checkpoint=True)
    msg = resumed_from(caplog)
    assert len(msg) == 1 and str(tmp_path / "checkpoint-1") in msg[0] and "skipped the newer checkpoint-2" in msg[0]
    assert [r.levelno for r in caplog.records if r.name == LOGGER and "resuming" in r.getMessage()] == [logging.WARNING]
    tokens = logged(again)
    assert sorted(tokens) == [1, 2, 3] and again.state.global_step == 3
    assert tokens[1] == at_ckpt1.num_input_tokens_seen  # the first run's step-1 log, kept in checkpoint-1
    assert tokens[2] > at_ckpt1.num_input_tokens_seen and tokens[3] > tokens[2]  # counted on, not from 0
    if kind == "var":  # same batches after the resume: the same counts as the run that was cut short
        assert tokens[2] == uninterrupted[2]
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()  # saved again, completely


def test_a_save_into_a_complete_folder_cut_short_does_not_look_complete(tmp_path, monkeypatch, caplog, var_data):
    """A run resumed from checkpoint-1 saves checkpoint-2 again over a complete one; cut short, the folder holds new
    weights next to the old trainer_state.json unless that was removed first (main: resume takes checkpoint-2)."""
    # the Trainer methods CompleteCheckpoints overrides or calls, as it was written against them
    import inspect

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(trl.GRPOTrainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert list(inspect.signature(Trainer.train).parameters)[:2] == ["self", "resume_from_checkpoint"]
    var_trainer(tmp_path, 2, var_data).train()
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    second = var_trainer(tmp_path, 2, var_data)
    stop_saving_at(second, "weights", monkeypatch)
    with pytest.raises(Killed):
        second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert not (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        var_trainer(tmp_path, 2, var_data).train(resume_from_checkpoint=True)
    msg = resumed_from(caplog)
    assert len(msg) == 1 and str(tmp_path / "checkpoint-1") in msg[0] and "checkpoint-2" in msg[0]


def test_a_complete_newest_checkpoint_is_named_at_info(tmp_path, caplog, var_data):
    """Nothing skipped: the checkpoint taken is said at INFO, and it is the newest (main: nothing is said)."""
    var_trainer(tmp_path, 2, var_data).train()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        var_trainer(tmp_path, 3, var_data).train(resume_from_checkpoint=True)
    records = [r for r in caplog.records if r.name == LOGGER and "resuming from" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO]
    assert records[0].getMessage().endswith(str(tmp_path / "checkpoint-2"))


def test_no_complete_checkpoint_is_a_clear_error(tmp_path, var_data):
    """Only checkpoints cut short: ValueError naming output_dir and the folders skipped (main: transformers' "Can't
    find a valid checkpoint at .../checkpoint-2", the newest folder, complete or not)."""
    for n in (1, 2):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_hi')
    with pytest.raises(ValueError, match=r"no complete checkpoint \(with a readable trainer_state.json\) in "
                                         rf"output_dir='{tmp_path}'; incomplete: checkpoint-2, checkpoint-1$"):
        var_trainer(tmp_path, 2, var_data).train(resume_from_checkpoint=True)


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from tiny_trainer import make_dataset, tiny_llama
from transformers import Trainer
from varkernels.training.trainer import VARConfig, VARTrainer

save_rng = Trainer._save_rng_state

def killed_while_saving(self, output_dir):  # weights, optimizer and scheduler of checkpoint-2 are written
    if self.state.global_step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng(self, output_dir)

Trainer._save_rng_state = killed_while_saving
args = VARConfig(output_dir={out!r}, max_steps=3, per_device_train_batch_size=1, logging_steps=1,
                 save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
VARTrainer(model=tiny_llama(), args=args, train_dataset=make_dataset(n=8, group_size=4)).train()
"""


@pytest.mark.slow  # about 15 s: a second Python process imports torch and transformers
def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path, caplog, var_data):
    """A training process SIGKILLed inside checkpoint-2's save (weights, optimizer and scheduler written, not the
    state); resume_from_checkpoint=True in this process takes checkpoint-1, warns about checkpoint-2 and num_tokens
    goes on (main: FileNotFoundError ... checkpoint-2/trainer_state.json)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = textwrap.dedent(KILLED_RUN).format(tests=str(ROOT / "tests"), out=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()
    assert not (tmp_path / "checkpoint-2" / "trainer_state.json").exists()
    at_ckpt1 = TrainerState.load_from_json(str(tmp_path / "checkpoint-1" / "trainer_state.json"))

    again = var_trainer(tmp_path, 3, var_data)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again.train(resume_from_checkpoint=True)
    msg = resumed_from(caplog)
    assert len(msg) == 1 and str(tmp_path / "checkpoint-1") in msg[0] and "skipped the newer checkpoint-2" in msg[0]
    tokens = logged(again)
    assert sorted(tokens) == [1, 2, 3] and tokens[2] > at_ckpt1.num_input_tokens_seen
