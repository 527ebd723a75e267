"""``varkernels-train``: VAR from a model path, a text dataset on disk and reward functions, in TRL's style.

    varkernels-train --model_name_or_path path/to/model --dataset_name data.jsonl \\
        --reward_funcs my_rewards:length_reward path/to/reward_model --group_size 8 --output_dir out
    varkernels-train --config var.yaml            # the same keys in YAML; flags given too override it

Arguments are the fields of :class:`ScriptArguments` and of :class:`varkernels.training.VARConfig`
(``transformers.HfArgumentParser``; ``--config`` reads a YAML file of them, like TRL's
``TrlParser``). The dataset is a folder written by ``datasets.Dataset.save_to_disk`` (or a
``DatasetDict``: ``--dataset_train_split`` picks the split), or a ``.json`` / ``.jsonl`` /
``.parquet`` file, in TRL's prompt/completion or preference format. Each ``--reward_funcs`` entry
is ``module:function`` (a module importable from the working directory, or ``path/to/file.py:function``)
or the path of a sequence-classification reward model. The trained policy (and its tokenizer) is
saved to ``output_dir``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Path (or hub id) of the policy, a causal LM."})
    dataset_name: str = field(
        metadata={"help": "A save_to_disk folder, or a .json / .jsonl / .parquet file (TRL's formats)."}
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Rewards: 'module:function' or 'file.py:function' callables, or reward-model paths."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a DatasetDict to train on."})
    dataset_test_split: Optional[str] = field(default=None, metadata={"help": "Split to evaluate on (optional)."})
    ref_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Reference model (default: the initial policy)."}
    )


def load_text_dataset(path: str, split: str = "train"):
    """A dataset from a ``save_to_disk`` folder or a json / jsonl / parquet file."""
    import datasets

    p = Path(path)
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {path!r} has splits {list(ds)}, not {split!r} (see --dataset_train_split)")
            ds = ds[split]
        return ds
    kinds = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    if p.suffix not in kinds:
        raise ValueError(
            f"dataset_name must be a save_to_disk folder or a .json / .jsonl / .parquet file, got {path!r}"
        )
    if not p.exists():
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    return datasets.load_dataset(kinds[p.suffix], data_files=str(p), split="train")


def resolve_reward(spec: str):
    """'module:function' or 'file.py:function' → the callable; anything else is a reward-model path."""
    if ":" not in spec or Path(spec).exists():
        return spec
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        mod_name = f"varkernels_reward_{Path(target).stem}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, target)
        if loader_spec is None or not Path(target).exists():
            raise ValueError(f"reward {spec!r}: no file {target!r}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no callable {name!r}")
    return fn


def parse_args(argv=None):
    """(ScriptArguments, VARConfig) from the command line, with ``--config FILE.yaml`` as defaults."""
    import yaml
    from transformers import HfArgumentParser

    from .trainer import VARConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ScriptArguments, VARConfig))
    if "--config" in argv:
        k = argv.index("--config")
        if k + 1 >= len(argv):
            raise ValueError("--config needs a YAML file")
        path = argv[k + 1]
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        del argv[k : k + 2]
        known = {a.dest: a for a in parser._actions}
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"--config {path}: unknown keys {unknown} (not fields of ScriptArguments or VARConfig)")
        for key, value in config.items():  # the file gives defaults; flags on the command line override them
            known[key].default = value
            known[key].required = False
    script_args, var_args = parser.parse_args_into_dataclasses(args=argv)
    return script_args, var_args


def main(argv=None):
    script_args, args = parse_args(argv)
    from .trainer import VARTrainer

    train = load_text_dataset(script_args.dataset_name, script_args.dataset_train_split)
    evaluation = None
    if script_args.dataset_test_split:
        evaluation = load_text_dataset(script_args.dataset_name, script_args.dataset_test_split)
    rewards = [resolve_reward(s) for s in script_args.reward_funcs] or None
    trainer = VARTrainer(model=script_args.model_name_or_path, ref_model=script_args.ref_model_name_or_path,
                         args=args, train_dataset=train, eval_dataset=evaluation, reward_funcs=rewards)
    trainer.train()
    trainer.save_model(args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
