"""Tiny models and helpers for the (IA)³ tests (ours versus HF PEFT as the oracle)."""

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


class ConvNet(nn.Module):
    """Conv2d → Conv2d (grouped) → Linear head."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3)
        self.conv1 = nn.Conv2d(8, 12, 3, groups=4)
        self.lin = nn.Linear(12 * 4 * 4, 4)

    def forward(self, x):
        return self.lin(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)
        self.lin = nn.Linear(4 * 3 * 3 * 3, 4)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


BUILDERS = {"mlp": MLP, "conv2d": ConvNet, "conv3d": Conv3dNet, "gpt2": D.tiny_gpt2, "llama": D.tiny_llama}


def build(name: str, seed: int = 0) -> nn.Module:
    """A fresh copy of base model ``name`` (same weights for the same seed), in eval mode."""
    return D.build(BUILDERS, name, seed)


def inputs(name: str, batch: int = 3, seed: int = 1):
    if name in ("gpt2", "llama"):
        return D.token_ids(batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    shape = {"mlp": (batch, 10), "conv2d": (batch, 3, 8, 8), "conv3d": (batch, 2, 5, 5, 5)}[name]
    return torch.randn(*shape, generator=g)
