"""Tiny models for the HRA tests (ours against HF PEFT as the oracle)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.testing import differential as D


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    """Conv2d 3×3 with padding 1, then one with stride 2: the layers HF PEFT adapts."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class OddConvNet(nn.Module):
    """Convolutions HF PEFT's HRA refuses or gets wrong: a 3×1 kernel with (1, 0) padding, a
    grouped, dilated, reflect-padded one, a Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, (3, 1), padding=(1, 0))
        self.conv1 = nn.Conv2d(4, 4, 3, groups=2, dilation=2, padding=2, padding_mode="reflect")
        self.conv2 = nn.Conv1d(4, 6, 3)
        self.head = nn.Linear(6 * 47, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(torch.relu(self.conv2(h.flatten(2))).flatten(1))


BUILDERS = {"mlp": MLP, "conv": ConvNet, "odd-conv": OddConvNet, "llama": D.tiny_llama}


def build(name: str, seed: int = 0) -> nn.Module:
    return D.build(BUILDERS, name, seed)


def inputs(name: str, batch: int = 3, seed: int = 1):
    if name == "llama":
        return D.token_ids(batch, seed=seed)
    shape = {"mlp": (batch, 8), "conv": (batch, 2, 7, 7), "odd-conv": (batch, 2, 7, 7)}[name]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
