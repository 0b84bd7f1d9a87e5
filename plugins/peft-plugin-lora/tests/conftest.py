import os
import sys

import pytest
import torch

# the helpers next to the tests (pytest runs with --import-mode=importlib)
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The models are tiny: intra-op threads only add overhead, and contention on a loaded
    machine (SVDs and small matmuls slow down many times over)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
