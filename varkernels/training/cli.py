"""``varkernels-train``: VAR from a model path, a text dataset and reward functions, in TRL's style
(``trl.TrlParser`` over :class:`ScriptArguments` and ``VARConfig``): docs/trainer.md, "Command line"."""

from __future__ import annotations

import importlib
import os
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import trl


@dataclass
class ScriptArguments(trl.ScriptArguments):
    dataset_name: Optional[str] = field(
        default=None, metadata={"required": True, "help": "A save_to_disk folder, a data file or a Hub dataset."}
    )
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"required": True, "help": "Path (or hub id) of the policy, a causal LM."}
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Rewards: 'module:function' or 'file.py:function' callables, or reward-model paths."},
    )
    ref_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Reference model (default: the initial policy)."}
    )
    dataset_test_split: Optional[str] = field(default=None, metadata={"help": "Split to evaluate on (optional)."})


def load_text_dataset(name: str, split: str = "train", config: Optional[str] = None):
    """A split of a ``save_to_disk`` folder, of a json / jsonl / csv / parquet file or of a Hub dataset."""
    import datasets

    if (Path(name) / "dataset_info.json").exists() or (Path(name) / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(name)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    builder = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(Path(name).suffix)
    if builder is not None:  # one file: its rows are the train split
        return datasets.load_dataset(builder, data_files=name, split="train")
    return datasets.load_dataset(name, config, split=split)


def resolve_reward(spec: str):
    """'module:function' or 'file.py:function' → the callable; anything else is a reward-model path."""
    if ":" not in spec or Path(spec).exists():
        return spec
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        fn = runpy.run_path(target).get(name)  # run as a script: its functions are hashed by value for the cache
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        fn = getattr(importlib.import_module(target), name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no callable {name!r}")
    return fn


def run(argv=None):
    """Parse, train and save; returns the trainer."""
    from .trainer import VARConfig, VARTrainer

    script_args, args = trl.TrlParser((ScriptArguments, VARConfig)).parse_args_and_config(argv)
    load = lambda split: load_text_dataset(script_args.dataset_name, split, script_args.dataset_config)  # noqa: E731
    trainer = VARTrainer(
        model=script_args.model_name_or_path, ref_model=script_args.ref_model_name_or_path, args=args,
        train_dataset=load(script_args.dataset_train_split),
        eval_dataset=load(script_args.dataset_test_split) if script_args.dataset_test_split else None,
        reward_funcs=[resolve_reward(s) for s in script_args.reward_funcs] or None,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


def main(argv=None) -> None:
    """The console script (``sys.exit(main())``): exit status 0 on success."""
    trainer = run(argv)
    if trainer.is_world_process_zero():
        print(f"varkernels-train: saved the trained model to {os.path.abspath(trainer.args.output_dir)}")


if __name__ == "__main__":
    main()
