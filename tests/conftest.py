"""Test set-up: Triton kernels run on CPU tensors in the interpreter (SPEC §4.1).

TRITON_INTERPRET must be set before triton is imported, so it is set here, first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
