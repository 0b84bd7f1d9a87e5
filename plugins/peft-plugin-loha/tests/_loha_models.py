"""Tiny models for the LoHa tests (ours against HF PEFT as the oracle): the kit's layer models."""

from peft_kernel.testing.layer_models import MLP, Conv1dNet, Conv2dNet, build, inputs

__all__ = ["MLP", "Conv1dNet", "Conv2dNet", "build", "inputs"]
