"""Tiny models for the LoHa tests (ours against HF PEFT as the oracle)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.testing import differential as D


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class Conv1dNet(nn.Module):
    """Conv1d with a kernel of 3, then one with a kernel of 1 (never in CP form)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv1d(4, 6, 3, padding=1), nn.Conv1d(6, 6, 1)
        self.head = nn.Linear(6 * 9, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class Conv2dNet(nn.Module):
    """Conv2d 3×3, a grouped 3×3 (stride 2) and a 1×1."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3)
        self.conv1 = nn.Conv2d(8, 8, 3, groups=2, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(torch.relu(self.conv2(h)).flatten(1))


BUILDERS = {"mlp": MLP, "conv1d": Conv1dNet, "conv2d": Conv2dNet, "llama": D.tiny_llama}


def build(name: str, seed: int = 0) -> nn.Module:
    return D.build(BUILDERS, name, seed)


def inputs(name: str, batch: int = 3, seed: int = 1):
    if name == "llama":
        return D.token_ids(batch, seed=seed)
    shape = {"mlp": (batch, 10), "conv1d": (batch, 4, 9), "conv2d": (batch, 3, 9, 9)}[name]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
