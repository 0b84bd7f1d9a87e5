"""Shared fixtures for the command-line tests (helpers live in cli_helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from cli_helpers import FAST, ok, run_cli  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """One adapter trained for 4 steps on the built-in model and data (shared, read-only)."""
    out = tmp_path_factory.mktemp("trained") / "adapter"
    result = ok(run_cli("finetune", *FAST, "--steps", "4", "--output", out))
    (out.parent / "stdout.txt").write_text(result.stdout)
    return out


@pytest.fixture(scope="session")
def trained_b(tmp_path_factory) -> Path:
    """A second LoRA adapter (other seed, rank and targets) for combination tests."""
    out = tmp_path_factory.mktemp("trained_b") / "adapter"
    ok(run_cli("finetune", "--method", "lora", "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--seed",
               "1", "--r", "4", "--target-modules", "q_proj,o_proj", "--output", out))
    return out


