"""Optional extras: a missing optional dependency fails with the extra to install, not a bare
ModuleNotFoundError (varkernels/_extras.py)."""

from __future__ import annotations

import importlib
import sys

import pytest


@pytest.fixture
def without(monkeypatch):
    """Make ``import <name>`` fail for the given packages and forget the modules that import them."""

    def hide(packages, modules):
        for p in packages:
            for m in [m for m in sys.modules if m == p or m.startswith(p + ".")]:
                monkeypatch.delitem(sys.modules, m)
            monkeypatch.setitem(sys.modules, p, None)  # None in sys.modules: ImportError on import
        for m in modules:
            parent, _, child = m.rpartition(".")
            if parent in sys.modules and hasattr(sys.modules[parent], child):
                # a re-import rebinds the parent's attribute: restore it too, not only sys.modules
                monkeypatch.setattr(sys.modules[parent], child, getattr(sys.modules[parent], child))
            monkeypatch.delitem(sys.modules, m, raising=False)

    return hide


def test_trainer_without_transformers_names_the_train_extra(without):
    without(["transformers"], ["varkernels.training.trainer"])
    with pytest.raises(ImportError, match=r'pip install "varkernels\[train\]"') as info:
        importlib.import_module("varkernels.training.trainer")
    assert info.value.name == "transformers"
    assert "varkernels.training.trainer needs transformers" in str(info.value)


def test_lazy_trainer_names_without_transformers(without):
    without(["transformers"], ["varkernels.training.trainer"])
    import varkernels

    with pytest.raises(ImportError, match=r'pip install "varkernels\[train\]"'):
        varkernels.VARTrainer  # noqa: B018 - the lazy attribute imports the trainer module


def test_scoring_and_data_need_no_transformers(without):
    """varkernels.training's scoring and data modules stay importable without the train extra."""
    without(["transformers"], ["varkernels.training", "varkernels.training.data", "varkernels.training.pairs",
                               "varkernels.training.lm_head"])
    training = importlib.import_module("varkernels.training")
    assert callable(training.cross_pair_rewards) and callable(training.make_groups)


def test_aot_without_triton_names_the_triton_extra(without):
    without(["triton"], ["tools.aot"])
    with pytest.raises(ImportError, match=r'pip install "varkernels\[triton\]"'):
        importlib.import_module("tools.aot")
