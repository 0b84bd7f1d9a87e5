"""Fixtures for the ecosystem tests (tox -e ecosystem).

In this env ``import peft`` is peft-kernel's compatibility package. HF PEFT is installed aside
(``PEFT_KERNEL_HF_PEFT_PATH``, a pip ``--target`` folder) and runs only in subprocesses that put
that folder first on ``PYTHONPATH``, so the two ``peft``s never meet in one interpreter.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    import peft

    compat = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.abspath(peft.__file__).startswith(compat):
        raise pytest.UsageError(f"`peft` must be peft-kernel's compat package here, not {peft.__file__}; "
                                "run these tests with tox -e ecosystem")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    from _ecosystem import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def hf_peft():
    """The HF PEFT oracle: an interpreter of its own (see _ecosystem.HFPeft)."""
    from _ecosystem import HFPeft

    oracle = HFPeft()
    yield oracle
    oracle.close()
