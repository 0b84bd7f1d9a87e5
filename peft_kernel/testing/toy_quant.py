"""A toy int8 quantization backend (per-row scale) for tests: what a backend plugin
provides, without any quantization library. Register ``ToyBackendPlugin()`` with
``peft_kernel.plugins.manager().register(...)`` and wrap layers with ``ToyInt8Linear``."""

import torch
from torch import nn

from peft_kernel import hookimpl
from peft_kernel.quant import QuantBackend


class ToyInt8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.zeros_like(linear.weight, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(linear.out_features))
        self.bias = linear.bias
        self.quantize(linear.weight.detach())

    def quantize(self, weight):
        self.scale = weight.abs().amax(1).clamp(min=1e-8) / 127
        self.qweight = torch.round(weight / self.scale[:, None]).to(torch.int8)

    def dequantize(self):
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)


class ToyBackend(QuantBackend):
    name = "toy-int8"

    def matches(self, module):
        return isinstance(module, ToyInt8Linear)

    def get_weight(self, module):
        return module.dequantize()

    def merge_blocker(self, module):
        return None

    def set_weight(self, module, weight):
        module.quantize(weight)


class ToyBackendPlugin:
    @hookimpl
    def peft_kernel_register_quant_backends(self, register):
        register(ToyBackend())


def quantize_linears(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``model`` (except the output head) by a ToyInt8Linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(module, child_name, ToyInt8Linear(child))
    return model
