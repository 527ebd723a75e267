"""Test set-up: Triton kernels run on CPU tensors in the interpreter (docs/design.md §4.1).

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


@pytest.fixture
def one_torch_thread():
    """Tiny models: one torch thread is as fast when idle, and >10x faster when the 2 cores are
    shared (spinning OpenMP workers); restored afterwards for the other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
