"""Helpers shared by the drop-in differential tests (``test_dropin*.py``)."""

from __future__ import annotations

import pytest
import torch
from _models import HF, OURS

from peft_kernel.testing import differential

#: run a test on HF PEFT and on ours
LIBS = pytest.mark.parametrize("lib", [HF, OURS], ids=["hf", "ours"])
X = torch.randn(5, 10, generator=torch.Generator().manual_seed(3))


def hf_bug_and_ours(reason: str, **xfail):
    """Parametrize ``lib`` for a test of the correct behaviour that HF PEFT fails (a strict xfail
    on HF's side, so it flips once HF is fixed)."""
    return pytest.mark.parametrize("lib", [pytest.param(HF, marks=pytest.mark.xfail(strict=True, reason=reason,
                                                                                     **xfail)), OURS],
                                   ids=["hf", "ours"])


def lora(lib, **kwargs):
    """A LoraConfig of ``lib`` for the ``mlp`` model (``lin0`` and ``lin1`` by default)."""
    kwargs.setdefault("target_modules", ["lin0", "lin1"])
    return lib.LoraConfig(**kwargs)


def perturb(model) -> None:
    """Random, trained-looking tensors in every adapter, active or not (factors, magnitudes, VeRA
    scales, modules_to_save copies)."""
    differential.perturb(model, seed=1, scale=0.3, inactive_adapters=True)
