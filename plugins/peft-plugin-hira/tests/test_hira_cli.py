"""``peft-kernel finetune --method hira`` trains (the loss falls), and the plugin is listed."""

import pytest

from peft_kernel.testing.cli import finetune, listed_plugins

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_finetune_trains_hira(tmp_path):
    losses = finetune("hira", tmp_path / "adapter", "--r", "4", "--steps", "30", "--batch-size", "8", "--seq-len", "32",
                      "--log-every", "10")
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.0, losses


def test_listed_by_peft_kernel_plugins():
    row = listed_plugins()["hira"]
    assert row["distribution"] == "peft-plugin-hira" and row["methods"] == ["HIRA"] and row["error"] is None
