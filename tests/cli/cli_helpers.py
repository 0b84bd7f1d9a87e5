"""Helpers for the command-line tests: every test drives ``python -m peft_kernel.cli``
in a subprocess, the way a user runs ``peft-kernel``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: tiny, fast training settings shared by the fixtures and the resume test
FAST = ["--method", "lora", "--batch-size", "4", "--seq-len", "32", "--seed", "0"]


def run_cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.pop("PEFT_KERNEL_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "peft_kernel.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def fails_cleanly(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, one line on stderr, no traceback; returns that line."""
    err = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def load_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def default_model():
    pytest.importorskip("transformers")
    from peft_kernel.cli._models import build_default_model

    return build_default_model()


def sample_ids():
    import torch

    from peft_kernel.cli._models import ByteTokenizer

    tok = ByteTokenizer()
    rows = [tok.encode("the cat says meow."), tok.encode("anna has two pears.")]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


TINY_TEXTS = [
    "the cat says meow .", "the dog says woof .", "anna has two pears .", "one plus two is three .",
    "after monday comes tuesday .", "ben likes to swim in the summer .",
]


class InProcess:
    """Result of :func:`call_cli` (the same fields as ``subprocess.CompletedProcess``)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call_cli(*args) -> InProcess:
    """Run ``peft_kernel.cli.main`` in this process — for the many quick input-validation
    cases, where a fresh interpreter per case would only add start-up time. The flows that
    matter end to end use :func:`run_cli`."""
    import contextlib
    import io

    from peft_kernel.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code
    return InProcess(code, out.getvalue(), err.getvalue())
