"""SSF's layer and tuner: the part of the plugin that needs torch.

The entry-point module (``peft_plugin_example``) imports this module only when the
method is used, so discovering the plugin stays torch-free.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel import AdapterLayer, BaseTuner


class SSFLayer(AdapterLayer):
    adapter_layer_names = ("ssf_scale", "ssf_shift")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs) -> None:
        super().__init__(base_layer, adapter_name=adapter_name)
        self.ssf_scale = nn.ParameterDict({})
        self.ssf_shift = nn.ParameterDict({})
        self.update_layer(adapter_name, config=config)

    def update_layer(self, adapter_name: str, config=None, **kwargs) -> None:
        init = config.init_scale if config is not None else 1.0
        self.ssf_scale[adapter_name] = nn.Parameter(torch.full((self.out_features,), float(init)))
        self.ssf_shift[adapter_name] = nn.Parameter(torch.zeros(self.out_features))

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        scale, shift = self.ssf_scale[adapter_name], self.ssf_shift[adapter_name]
        return (result * scale + shift).to(result.dtype)

    # merging: y = γ(Wx + b) + β is the linear layer (diag(γ) W, γ b + β)
    def merge_blocker(self) -> str | None:
        if self.get_base_layer().bias is None:
            return "SSF folds its shift into the bias, and this layer has none"
        return super().merge_blocker()

    def merge_weight(self, weight, adapter_name):
        return weight * self.ssf_scale[adapter_name].to(weight.dtype)[:, None]

    def unmerge_weight(self, weight, adapter_name):
        return weight / self.ssf_scale[adapter_name].to(weight.dtype)[:, None]

    def merge_bias(self, adapter_name: str, sign: int) -> None:
        bias = self.get_base_layer().bias
        scale = self.ssf_scale[adapter_name].to(bias.dtype)
        shift = self.ssf_shift[adapter_name].to(bias.dtype)
        with torch.no_grad():
            bias.copy_(bias * scale + shift if sign > 0 else (bias - shift) / scale)

    def __repr__(self) -> str:
        return "ssf." + super().__repr__()


class SSFModel(BaseTuner):
    prefix = "ssf_"
    layer_cls = SSFLayer
    supported_layer_types = ("torch.nn.Linear",)
