import os
import sys

import pytest

# the helpers next to the tests
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds a virtual environment; run with PEFT_KERNEL_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PEFT_KERNEL_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set PEFT_KERNEL_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
