"""The ``peft-kernel`` command line from a plugin's tests, run in a subprocess as a user runs it.

    losses = finetune("mymethod", tmp_path / "adapter", "--r", "4", "--steps", "30")
    assert losses[-1] < losses[0]
    assert listed_plugins()["mymethod"]["methods"] == ["MYMETHOD"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run(*args) -> str:
    """``peft-kernel <args>`` (one torch thread); its stdout. A non-zero exit fails with stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "peft_kernel.cli", *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def finetune(method: str, output: Path, *args) -> list[float]:
    """``peft-kernel finetune --method <method> --output <output> <args>`` on the built-in model
    and data; the logged losses. Checks the adapter was saved with the method's ``peft_type``."""
    run("finetune", "--method", method, "--output", output, *args)
    assert json.loads((Path(output) / "adapter_config.json").read_text())["peft_type"] == method.upper()
    state = json.loads((Path(output) / "trainer_state.json").read_text())
    return [loss for _, loss in state["loss_history"]]


def listed_plugins() -> dict[str, dict]:
    """``peft-kernel plugins --json`` by plugin name."""
    return {row["name"]: row for row in json.loads(run("plugins", "--json"))}
