"""``peft-kernel finetune --method loha`` trains (the loss falls), and the plugin is listed."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def peft_kernel_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "peft_kernel.cli", *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_finetune_trains_loha(tmp_path):
    out = tmp_path / "adapter"
    peft_kernel_cli("finetune", "--method", "loha", "--r", "4", "--steps", "30", "--batch-size", "8", "--seq-len", "32",
                    "--log-every", "10", "--output", out)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LOHA"
    losses = [loss for _, loss in json.loads((out / "trainer_state.json").read_text())["loss_history"]]
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.0, losses


def test_listed_by_peft_kernel_plugins():
    rows = {row["name"]: row for row in json.loads(peft_kernel_cli("plugins", "--json"))}
    assert rows["loha"]["distribution"] == "peft-plugin-loha" and rows["loha"]["methods"] == ["LOHA"]
    assert rows["loha"]["error"] is None
