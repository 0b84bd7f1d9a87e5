"""Tiny models and helpers for the VeRA tests (ours versus HF PEFT as the oracle)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.testing import differential as D
from peft_kernel.testing.differential import assert_close, assert_differs, perturb, run

__all__ = ["BUILDERS", "assert_close", "assert_differs", "build", "inputs", "perturb", "run"]


class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 30, bias=bias)
        self.lin2 = nn.Linear(30, 4, bias=bias)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


BUILDERS = {"mlp": MLP, "mlp_nobias": lambda: MLP(bias=False), "gpt2": D.tiny_gpt2, "llama": D.tiny_llama}


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of base model ``name`` (same weights for the same seed), in eval mode."""
    return D.build(BUILDERS, name, seed)


def inputs(name: str, batch: int = 3, seed: int = 1):
    if name in ("gpt2", "llama"):
        return D.token_ids(batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 10, generator=g)
