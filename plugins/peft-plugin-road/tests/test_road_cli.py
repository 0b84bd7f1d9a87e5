"""``peft-kernel finetune --method road`` trains (the loss falls), and the plugin is listed."""

import pytest

from peft_kernel.testing.cli import finetune, listed_plugins

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_finetune_trains_road(tmp_path):
    losses = finetune("road", tmp_path / "adapter", "--target-modules", "all-linear", "--option", 'variant="road_4"',
                      "--lr", "0.1", "--steps", "30", "--batch-size", "8", "--seq-len", "32", "--log-every", "10")
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.0, losses


def test_listed_by_peft_kernel_plugins():
    row = listed_plugins()["road"]
    assert row["distribution"] == "peft-plugin-road" and row["methods"] == ["ROAD"] and row["error"] is None
