import os
import sys
import warnings

import pytest

# the test modules import the shared helpers as ``_models``
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The models are tiny: intra-op threading only adds overhead (and contention on shared
    machines), so run these modules single-threaded; restore the setting afterwards."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_warnings():
    # Both libraries warn about e.g. fan_in_fan_out or unmergeable layers; the
    # differential tests compare behaviour, not warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
