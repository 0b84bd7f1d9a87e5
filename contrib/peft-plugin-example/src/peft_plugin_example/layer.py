"""SSF's layer and tuner: the part of the plugin that needs torch.

SSF is a weight transform: ``y = γ ⊙ (W x + b) + β`` is the linear layer with weight
``diag(γ) W`` and bias ``γ ⊙ b + β``. The layer states that (and its inverse, for unmerging)
on peft-kernel's :class:`~peft_kernel.WeightDeltaLayer`, which does the rest: forward,
merging, several adapters, mixed batches, dtypes, quantized bases. A layer without a bias
still trains, but cannot merge (there is no bias to fold β into).

The entry-point module (``peft_plugin_example``) imports this module only when the
method is used, so discovering the plugin stays torch-free.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel import BaseTuner, WeightDeltaLayer


class SSFLayer(WeightDeltaLayer):
    adapter_layer_names = ("ssf_scale", "ssf_shift")

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self.ssf_scale[adapter_name] = nn.Parameter(torch.full((self.out_features,), float(config.init_scale)))
        self.ssf_shift[adapter_name] = nn.Parameter(torch.zeros(self.out_features))

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight * self.ssf_scale[adapter_name][:, None]

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight / self.ssf_scale[adapter_name][:, None]

    def transform_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor:
        shift = self.ssf_shift[adapter_name]
        return shift if bias is None else bias * self.ssf_scale[adapter_name] + shift

    def untransform_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return (bias - self.ssf_shift[adapter_name]) / self.ssf_scale[adapter_name]

    def __repr__(self) -> str:
        return "ssf." + super().__repr__()


class SSFModel(BaseTuner):
    prefix = "ssf_"
    layer_cls = SSFLayer
    dispatch_types = ()  # the kernel builds SSFLayer on linear layers of every kind (Conv1D, quantized too)
    supported_layer_types = ("torch.nn.Linear", "transformers Conv1D", "quantized linear layers")
