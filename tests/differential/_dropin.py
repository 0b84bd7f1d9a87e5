"""Helpers shared by the drop-in differential tests (``test_dropin*.py``)."""

from __future__ import annotations

import pytest
import torch
from _models import HF, OURS

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


def perturb(model, seed: int = 1) -> None:
    """Random, trained-looking adapter tensors (factors, magnitudes, biases, VeRA scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name or "vera_lambda" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
