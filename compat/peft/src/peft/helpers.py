"""``peft.helpers``: what diffusers imports from HF PEFT's helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def disable_input_dtype_casting(model: nn.Module, active: bool = True) -> Iterator[None]:
    """Accepted and without effect: diffusers wraps its layerwise casting in this. peft-kernel's
    layers always cast their input to the adapter's dtype (diffusers keeps adapter tensors out of
    layerwise casting, so that dtype is the compute dtype)."""
    yield
