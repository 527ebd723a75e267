"""Run TRL's own ``GRPOTrainer`` test file against ``trl.GRPOTrainer`` and against ``OnlineVARTrainer``.

    python tools/trl_grpo_tests.py /path/to/trl/tests [--out DIR] [-k EXPR] [--only grpo|onlinevar]

(or ``TRL_TESTS=/path/to/trl/tests``; the tests come from a TRL checkout of the pinned release, e.g.
``git clone --branch v1.16.0 https://github.com/huggingface/trl``: PyPI's sdist has none.) TRL's
tests load tiny checkpoints and datasets from the Hugging Face Hub; this tool builds local stand-ins
once and runs offline:

* every ``trl-internal-testing/tiny-<Architecture>[-suffix]`` id named in the test file becomes a
  randomly initialised model of that transformers architecture (2 layers, hidden size 16, bf16 as on
  the Hub) with a byte-level tokenizer and chat template of its family (Qwen's special tokens at
  Qwen's ids, so tests that hard-code ``<|im_end|>`` = 151645 see it), written in the Hub cache layout
  under ``--cache`` and read with ``HF_HUB_OFFLINE=1``. Ids it cannot build (vision-language models,
  full-size checkpoints) are not there: a test that loads one is reported skipped, naming the id.
* ``datasets.load_dataset("trl-internal-testing/zen", <config>)`` returns the Zen of Python in TRL's
  prompt-only and prompt-completion formats (train: 17 rows, test: 2), built in memory.
* without a GPU every ``TrainingArguments`` gets ``use_cpu=True`` (TRL's default ``bf16=True`` refuses to
  start on CPU otherwise), in both passes.

Only ``test_grpo_trainer.py`` and ``testing_utils.py`` are copied out of the TRL folder (into a temp
directory), so no ``conftest.py`` of the checkout runs. The file runs twice, each in its own pytest
process: once as it is, once with ``trl.GRPOTrainer`` / ``trl.GRPOConfig`` replaced by
``OnlineVARTrainer`` / ``OnlineVARConfig`` before the test module imports them. Written to ``--out``:
``grpo.txt`` and ``onlinevar.txt`` (one line per test: outcome, test, one-line reason) and
``diff.txt`` (the tests whose outcomes differ, the by-design ones marked); exit status 1 when a test
that passes with GRPOTrainer fails with OnlineVARTrainer for a reason not in ``BY_DESIGN``.

This module is also the pytest plugin of each run (``-p tools.trl_grpo_tests``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_FILE, UTILS_FILE = "test_grpo_trainer.py", "testing_utils.py"
ENV_TRAINER, ENV_RESULTS, ENV_TIMEOUT = "VARKERNELS_TRL_TRAINER", "VARKERNELS_TRL_RESULTS", "VARKERNELS_TRL_TIMEOUT"
ORG = "trl-internal-testing"
BUILD_VERSION = "1"  # bump when the stand-ins change: a cache built by another version is rebuilt

# GRPO options OnlineVARConfig rejects by design (docs/online.md, "`beta` and `var_beta`"): a test whose
# only difference is one of these counts as expected. Keyed by test name (without parameters).
BY_DESIGN = {
    "test_training_beta_non_zero": "beta must be 0.0 (OnlineVARTrainer has no KL term; var_beta is VAR's "
                                   "temperature)",
    "test_training_with_bias_correction_kl": "beta must be 0.0 (the test sets beta=0.1)",
    "test_training_vlm_beta_non_zero": "beta must be 0.0 (the test sets beta=0.1)",
}

# ---------------------------------------------------------------------------------------------- stand-ins

ZEN = [
    ("Beautiful is better than", " ugly."), ("Explicit is", " better than implicit."),
    ("Simple is better", " than complex."), ("Complex", " is better than complicated."),
    ("Flat is better than", " nested."), ("Sparse is better", " than dense."), ("Readability", " counts."),
    ("Special cases aren't special", " enough to break the rules."), ("Although practicality beats", " purity."),
    ("Errors should never", " pass silently."), ("Unless explicitly", " silenced."),
    ("In the face of ambiguity, refuse", " the temptation to guess."),
    ("There should be one-- and preferably", " only one --obvious way to do it."),
    ("Although that way may not be", " obvious at first unless you're Dutch."), ("Now is better", " than never."),
    ("Although never is often better than", " *right* now."),
    ("If the implementation is hard to explain,", " it's a bad idea."),
    ("If the implementation is easy", " to explain, it may be a good idea."),
    ("Namespaces are one honking great", " idea -- let's do more of those!"),
]
N_TRAIN = 17

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>"]  # from id 151643, Qwen2.5's layout
QWEN3_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
          "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
         "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PLAIN = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
         "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")


def byte_tokenizer(head, n_fillers, tail, template, **special):
    """A byte-level BPE without merges: ``head`` special tokens, the 256 byte symbols, ``n_fillers`` unused
    tokens (so that ``tail`` lands at the ids the real tokenizer gives it), then ``tail``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    byte_symbols.sort()
    vocab = {t: i for i, t in enumerate(head)}
    for s in byte_symbols:
        vocab[s] = len(vocab)
    for i in range(n_fillers):
        vocab[f"zz{i}"] = len(vocab)
    for t in tail:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in head + tail])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = template
    return fast


def family_tokenizer(arch: str):
    if arch.startswith("Qwen3"):
        tail = QWEN_SPECIALS + QWEN3_EXTRA
    elif arch.startswith("Qwen"):
        tail = QWEN_SPECIALS
    else:
        tail = None
    if tail is not None:  # Qwen: <|endoftext|> = 151643 (pad), <|im_end|> = 151645 (eos)
        return byte_tokenizer([], 151643 - 256, tail, CHATML, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    if arch.startswith("Llama"):  # Llama 3.2: no pad token (tests set <|finetune_right_pad_id|>)
        return byte_tokenizer([], 0, LLAMA3_SPECIALS, LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    if arch.startswith("Gemma"):
        return byte_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], 0, [],
                              GEMMA, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    return byte_tokenizer(["<unk>", "<s>", "</s>"], 0, [], PLAIN, bos_token="<s>", eos_token="</s>",
                          unk_token="<unk>")


def tiny_model(arch: str, tok):
    """A random-init model of ``arch`` (a transformers class name), 2 layers of width 16, in bf16."""
    import torch
    import transformers

    cls = getattr(transformers, arch)
    defaults = cls.config_class()
    sizes = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=4, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                 moe_intermediate_size=16)
    kwargs = {k: v for k, v in sizes.items() if hasattr(defaults, k)}
    kwargs.update(vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if arch.endswith("ForSequenceClassification"):
        kwargs["num_labels"] = 1
    torch.manual_seed(0)
    return cls(cls.config_class(**kwargs)).to(torch.bfloat16)


def hub_ids(test_source: str) -> list[str]:
    return sorted(set(re.findall(rf"{ORG}/tiny-[A-Za-z0-9_.\-]+", test_source)))


def buildable(model_id: str):
    """The transformers class name of ``model_id`` when this tool builds it (a text model), else None."""
    import transformers

    arch = model_id.split("/tiny-", 1)[1].split("-")[0]
    if not re.search(r"For(CausalLM|SequenceClassification)$", arch) or not hasattr(transformers, arch):
        return None
    return arch


def build_cache(cache: Path, test_source: str) -> dict:
    """Write a stand-in for every buildable hub id of the test file in the Hub cache layout; reuse a cache
    this version built for the same ids. Returns {"built": [...], "not_built": [...]}."""
    ids = hub_ids(test_source)
    stamp = cache / "varkernels-stand-ins.json"
    if stamp.exists():
        done = json.loads(stamp.read_text())
        if done.get("version") == BUILD_VERSION and set(done["built"]) | set(done["not_built"]) >= set(ids):
            return done
    built, not_built = [], []
    for model_id in ids:
        arch = buildable(model_id)
        if arch is None:
            not_built.append(model_id)
            continue
        repo = cache / ("models--" + model_id.replace("/", "--"))
        commit = "0" * 40
        snap = repo / "snapshots" / commit
        shutil.rmtree(repo, ignore_errors=True)
        snap.mkdir(parents=True)
        tok = family_tokenizer(arch)
        tiny_model(arch, tok).save_pretrained(snap)
        tok.save_pretrained(snap)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        built.append(model_id)
    done = {"version": BUILD_VERSION, "built": built, "not_built": not_built}
    stamp.write_text(json.dumps(done, indent=1))
    return done


def zen(config: str):
    """TRL's "zen" test dataset in the format ``config`` names (prompt-only / prompt-completion)."""
    from datasets import Dataset, DatasetDict

    def rows(part):
        if config == "standard_prompt_only":
            return {"prompt": [p for p, _ in part]}
        if config == "standard_prompt_completion":
            return {"prompt": [p for p, _ in part], "completion": [c for _, c in part]}
        if config == "conversational_prompt_only":
            return {"prompt": [[{"role": "user", "content": f"What is {p}?"}] for p, _ in part]}
        if config == "conversational_prompt_completion":
            return {"prompt": [[{"role": "user", "content": f"What is {p}?"}] for p, _ in part],
                    "completion": [[{"role": "assistant", "content": c.strip()}] for _, c in part]}
        raise LookupError(f"no local build of {ORG}/zen config {config!r}")

    return DatasetDict(train=Dataset.from_dict(rows(ZEN[:N_TRAIN])), test=Dataset.from_dict(rows(ZEN[N_TRAIN:])))


# -------------------------------------------------------------------------------------------- the plugin


def pytest_configure(config):
    import datasets

    original = datasets.load_dataset

    def load_dataset(path, name=None, *args, split=None, **kwargs):
        if not str(path).startswith(f"{ORG}/"):
            return original(path, name, *args, split=split, **kwargs)
        try:
            if path != f"{ORG}/zen":
                raise LookupError(f"no local build of dataset {path}")
            data = zen(name)
        except LookupError as e:
            pytest.skip(str(e))
        return data if split is None else data[split]

    datasets.load_dataset = load_dataset
    _cpu_only_training_args()
    if os.environ.get(ENV_TRAINER) == "onlinevar":
        import trl

        from varkernels.training.online import OnlineVARConfig, OnlineVARTrainer

        trl.GRPOTrainer, trl.GRPOConfig = OnlineVARTrainer, OnlineVARConfig


def _cpu_only_training_args():
    """Without an accelerator, every TrainingArguments gets use_cpu=True: TRL's default bf16=True otherwise
    refuses to start ("Your setup doesn't support bf16/gpu"), in both passes alike."""
    import torch
    import transformers

    if torch.cuda.is_available():
        return
    post_init = transformers.TrainingArguments.__post_init__

    def __post_init__(self):
        self.use_cpu = True
        post_init(self)

    transformers.TrainingArguments.__post_init__ = __post_init__


def _timeout(signum, frame):
    raise TimeoutError(f"test ran past {os.environ.get(ENV_TIMEOUT)} s ({ENV_TIMEOUT})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    seconds = int(os.environ.get(ENV_TIMEOUT, "0")) if hasattr(signal, "SIGALRM") else 0
    if seconds:
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(seconds)
    try:
        yield
    finally:
        if seconds:
            signal.alarm(0)


def _missing_hub_id(item, excinfo):
    """The hub id a test failed to load offline (not in the stand-in cache), else None."""
    exc, seen = excinfo.value, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if isinstance(exc, OSError) and "offline" in text and "cache" in text:
            break
        exc = exc.__cause__ or exc.__context__
    else:
        return None
    params = getattr(getattr(item, "callspec", None), "params", None)
    text = str(params) if params else inspect.getsource(item.function)
    cache = Path(os.environ.get("HF_HUB_CACHE", "."))
    absent = [i for i in re.findall(r"[A-Za-z0-9_\-]+/[A-Za-z0-9_.\-]+", text)
              if "/" in i and not (cache / ("models--" + i.replace("/", "--"))).exists() and i.count("/") == 1]
    return ", ".join(dict.fromkeys(absent)) or "a checkpoint"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and (report.failed or hasattr(report, "wasxfail")):
        missing = _missing_hub_id(item, call.excinfo)  # also under xfail: a missing checkpoint is no xfail
        if missing is not None:
            report.__dict__.pop("wasxfail", None)
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"Skipped: needs {missing} from the Hub (no local stand-in)")


def _outcome(report) -> tuple[str, str]:
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), report.wasxfail
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
        return ("failed" if report.when == "call" else "error"), " ".join(text.split())[:300]
    return "passed", ""


def pytest_runtest_logreport(report):
    path = os.environ.get(ENV_RESULTS)
    if not path or not (report.when == "call" or report.failed or report.skipped):
        return
    outcome, reason = _outcome(report)
    with open(path, "a") as f:
        f.write(json.dumps({"test": report.nodeid.split("::", 1)[1], "outcome": outcome, "reason": reason,
                            "seconds": round(report.duration, 1)}) + "\n")


# ------------------------------------------------------------------------------------------------ the CLI


def run_pass(work: Path, cache: Path, trainer: str, results: Path, timeout: int, select: str | None) -> dict:
    results.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(cache),
               HF_HOME=str(work / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env[ENV_TRAINER], env[ENV_RESULTS], env[ENV_TIMEOUT] = trainer, str(results), str(timeout)
    cmd = [sys.executable, "-m", "pytest", f"trl_tests/{TEST_FILE}", "-p", "tools.trl_grpo_tests",
           "-p", "no:cacheprovider", "-c", "pytest.ini", "--rootdir", str(work), "-q", "-W", "ignore"]
    if select:
        cmd += ["-k", select]
    print(f"[{trainer}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=work, env=env, check=False)
    outcomes = {}
    if not results.exists():
        raise SystemExit(f"[{trainer}] no test ran (a collection error? see pytest's output above)")
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["test"] not in outcomes or outcomes[row["test"]]["outcome"] == "passed":  # a teardown error wins
            outcomes[row["test"]] = row
    return outcomes


def counts(outcomes: dict) -> str:
    tally = {}
    for row in outcomes.values():
        tally[row["outcome"]] = tally.get(row["outcome"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(tally.items(), key=lambda kv: -kv[1])) or "no tests ran"


def write_table(path: Path, title: str, outcomes: dict):
    lines = [f"# {title}: {counts(outcomes)}"]
    lines += [f"{r['outcome']}\t{t}\t{r['reason']}" for t, r in sorted(outcomes.items())]
    path.write_text("\n".join(lines) + "\n")


def compare(grpo: dict, var: dict) -> tuple[list[str], list[str]]:
    """Lines of diff.txt, and the tests GRPOTrainer passes that OnlineVARTrainer fails outside BY_DESIGN."""
    lines, regressions = [], []
    for test in sorted(set(grpo) & set(var)):  # (a -k run compared with an earlier full pass: its tests)
        g, v = grpo[test], var[test]
        if g["outcome"] == v["outcome"]:
            continue
        why = BY_DESIGN.get(test.split("[")[0].split("::")[-1])
        if g["outcome"] == "passed" and v["outcome"] != "passed" and why is None:
            regressions.append(test)
        tag = f"by design: {why}" if why else v.get("reason", "")
        lines.append(f"{test}\tgrpo={g['outcome']}\tonlinevar={v['outcome']}\t{tag}")
    return lines, regressions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trl_tests", nargs="?", default=os.environ.get("TRL_TESTS"),
                        help="the tests/ folder of a TRL checkout (default: $TRL_TESTS)")
    parser.add_argument("--out", default="trl_grpo_results", help="where the tables go")
    parser.add_argument("--cache", default=None, help="stand-in cache (default: a folder of the temp dir)")
    parser.add_argument("--only", choices=["grpo", "onlinevar"],
                        help="run one pass only (compared with the other pass's earlier results in --out)")
    parser.add_argument("-k", dest="select", help="pytest -k expression")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test (SIGALRM), 0: none")
    args = parser.parse_args(argv)
    if not args.trl_tests:
        parser.error("give the tests/ folder of a TRL checkout (or set TRL_TESTS)")
    src = Path(args.trl_tests)
    missing = [n for n in (TEST_FILE, UTILS_FILE) if not (src / n).is_file()]
    if missing:
        parser.error(f"{src} lacks {', '.join(missing)}: give the tests/ folder of a TRL checkout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trl-grpo-tests-") as tmp:
        work = Path(tmp)
        (work / "trl_tests").mkdir()
        for name in (TEST_FILE, UTILS_FILE):
            shutil.copy(src / name, work / "trl_tests" / name)
        (work / "trl_tests" / "__init__.py").write_text("")
        (work / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: TRL's slow tests\n")
        cache = Path(args.cache) if args.cache else work / "hub"
        cache.mkdir(parents=True, exist_ok=True)
        stand_ins = build_cache(cache, (src / TEST_FILE).read_text())
        print(f"stand-ins in {cache}: {len(stand_ins['built'])} built; not built: {stand_ins['not_built']}")
        runs = {}
        for trainer in ("grpo", "onlinevar"):
            if args.only in (None, trainer):
                runs[trainer] = run_pass(work, cache, trainer, out / f"{trainer}.jsonl", args.timeout, args.select)
                title = "trl.GRPOTrainer" if trainer == "grpo" else "OnlineVARTrainer swapped in"
                write_table(out / f"{trainer}.txt", title, runs[trainer])
                print(f"[{trainer}] {counts(runs[trainer])}")
    for trainer in ("grpo", "onlinevar"):  # --only: compare with the other pass of an earlier run in --out
        if trainer not in runs and (out / f"{trainer}.jsonl").exists():
            runs[trainer] = {r["test"]: r for r in map(json.loads, (out / f"{trainer}.jsonl").read_text().splitlines())}
            print(f"[{trainer}] from the earlier run in {out}: {counts(runs[trainer])}")
    if len(runs) < 2:
        return 0
    lines, regressions = compare(runs["grpo"], runs["onlinevar"])
    head = [f"# grpo: {counts(runs['grpo'])}", f"# onlinevar: {counts(runs['onlinevar'])}",
            f"# {len(lines)} tests differ; {len(regressions)} pass with GRPOTrainer and fail with OnlineVARTrainer "
            "outside the by-design list"]
    (out / "diff.txt").write_text("\n".join(head + lines) + "\n")
    print("\n".join(head + lines))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
