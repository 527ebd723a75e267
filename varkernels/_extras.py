"""Optional dependencies: an ImportError that names the extra to install.

    try:
        from transformers import Trainer
    except ImportError as e:
        raise missing_extra("transformers", "train", "varkernels.training.trainer") from e

Extras (pyproject.toml): ``train`` (transformers, accelerate, tqdm), ``triton`` (triton),
``bench`` (matplotlib, liger-kernel, cut-cross-entropy), ``test``.
"""

from __future__ import annotations


def missing_extra(package: str, extra: str, needed_by: str) -> ImportError:
    """The error to raise when ``package`` of the extra ``extra`` cannot be imported."""
    return ImportError(
        f"{needed_by} needs {package}, which is not installed; install varkernels with its {extra!r} extra: "
        f'pip install "varkernels[{extra}]" (or pip install {package})',
        name=package,
    )
