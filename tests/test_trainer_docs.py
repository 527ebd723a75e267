"""docs/trainer.md opens with the text quick start, and it runs as printed (like README's blocks in test_readme.py)."""

import time
from pathlib import Path

import pytest
from doc_blocks import quick_start

ROOT = Path(__file__).resolve().parent.parent
TRAINER_MD = ROOT / "docs" / "trainer.md"


def test_quick_start_fits_on_one_screen():
    assert len(quick_start().splitlines()) <= 30


@pytest.mark.usefixtures("one_torch_thread")
def test_trainer_md_quick_start_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    monkeypatch.chdir(tmp_path)  # output_dir and the score cache are relative paths
    namespace = {"__name__": "trainer_md_quick_start"}
    start = time.perf_counter()
    exec(compile(quick_start(), "docs/trainer.md quick start", "exec"), namespace)
    print(f"docs/trainer.md quick start: {time.perf_counter() - start:.2f} s")
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 4
    assert (tmp_path / "var-quickstart" / "model.safetensors").exists()
    assert len(list((tmp_path / "var-quickstart" / "var_scores").glob("var-scores-*.pt"))) == 1
    log = trainer.state.log_history[0]
    assert {"loss", "reward", "reward_std", "num_tokens", "var/ess"} <= set(log)
    # the rewards it trained on are the reward function of the texts
    ds, fn = trainer.train_dataset, namespace["share_of_w1"]
    texts = ds.examples.completion_texts
    for g, idx in enumerate(ds.groups):
        for b, j in enumerate(idx):
            assert ds.rewards[g, 0, b].item() == pytest.approx(fn([], [texts[j]])[0])


def test_docs_do_not_use_the_deprecated_torch_dtype():
    for path in (ROOT / "docs").glob("*.md"):
        assert "torch_dtype=" not in path.read_text(encoding="utf-8"), path.name
    assert "torch_dtype=" not in (ROOT / "README.md").read_text(encoding="utf-8")
