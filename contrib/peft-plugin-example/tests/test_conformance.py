"""The example plugin passes peft-kernel's conformance kit, unchanged."""

import torch
from torch import nn

from peft_kernel.testing import Case, MethodConformance
from peft_plugin_example import SSFConfig


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(20, 6)
        self.lin2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin2(self.act(self.lin1(self.act(self.lin0(x)))))


class TestSSFConformance(MethodConformance):
    cases = [
        Case("mlp", MLP, lambda: SSFConfig(target_modules=["lin0", "lin1"]), lambda: torch.randn(5, 10)),
        Case("all-linear-and-head", MLP, lambda: SSFConfig(target_modules="all-linear", modules_to_save=["lin2"]),
             lambda: torch.randn(5, 10)),
        Case("regex", MLP, lambda: SSFConfig(target_modules=r"lin[12]"), lambda: torch.randn(2, 3, 10)),
    ]
