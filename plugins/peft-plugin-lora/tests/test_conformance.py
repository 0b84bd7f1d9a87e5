"""LoRA runs the kernel's conformance kit on every layer type it supports."""

import _lora_models as M
import torch
from torch import nn

from peft_kernel.testing import Case, MethodConformance
from peft_plugin_lora import LoraConfig


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 4, bias=False)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


class ConvNet(nn.Module):
    def __init__(self, dim):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv = conv(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.conv(x).flatten(2).mean(-1)
        return self.head(h)


class EmbModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.lin = nn.Linear(8, 3)

    def forward(self, x):
        return self.lin(self.emb(x))


class MHAModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


def conv_input(dim):
    return lambda: torch.randn(2, 3, *([6] * dim))


class TestLoraConformance(MethodConformance):
    cases = [
        Case("linear", MLP, lambda: LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8),
             lambda: torch.randn(5, 10)),
        Case("linear-dora-rslora", MLP,
             lambda: LoraConfig(target_modules=["lin0"], r=4, use_dora=True, use_rslora=True),
             lambda: torch.randn(5, 10)),
        Case("linear-bias-all", MLP, lambda: LoraConfig(target_modules=["lin0"], bias="all", lora_dropout=0.1),
             lambda: torch.randn(5, 10)),
        Case("modules-to-save", MLP, lambda: LoraConfig(target_modules=["lin0"], modules_to_save=["lin1"]),
             lambda: torch.randn(5, 10)),
        Case("conv1d", lambda: ConvNet(1), lambda: LoraConfig(target_modules=["conv"], r=4), conv_input(1)),
        Case("conv2d", lambda: ConvNet(2), lambda: LoraConfig(target_modules=["conv"], r=4, use_dora=True),
             conv_input(2)),
        Case("conv3d", lambda: ConvNet(3), lambda: LoraConfig(target_modules=["conv", "head"], r=4), conv_input(3)),
        Case("embedding", EmbModel, lambda: LoraConfig(target_modules=["emb"], r=4),
             lambda: torch.randint(0, 50, (3, 7))),
        Case("embedding-dora", EmbModel, lambda: LoraConfig(target_modules=["emb"], r=4, use_dora=True),
             lambda: torch.randint(0, 50, (3, 7))),
        Case("multihead-attention", MHAModel, lambda: LoraConfig(target_modules=["mha"], r=4),
             lambda: torch.randn(2, 5, 8)),
        Case("target-parameters", M.moe,
             lambda: LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"], r=2),
             lambda: torch.randn(2, 3, 8)),
    ]

