"""QA-LoRA, quantization-aware LoRA (``use_qalora``, ``qalora_group_size``), on GPTQ layers.

A sees the input averaged over groups of G = ``qalora_group_size`` consecutive features, so
it is (r × in / G) and the update is constant within each group, like GPTQ's per-group
quantization parameters:

    h = W x + s · B A (n · pool_G(x))        pool_G: the mean of each group, n = in / G

(the factor n is HF PEFT's). As in HF PEFT it applies to GPTQ layers only (the quantization
backend named "gptq"); other layers of such an adapter get plain LoRA, with a warning.
The update as a weight is s · B (A ⊗ 1ᵀ_G) · n / G, which ``convert_to_lora`` uses; GPTQ
layers themselves refuse merging.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peft_kernel import PeftWarning, quant

from . import LoraVariant

#: the quantization backend whose layers QA-LoRA adapts
BACKEND = "gptq"


class QaLora(LoraVariant):
    field = "use_qalora"
    title = "QA-LoRA"
    containers = {"qalora_group_size": (dict, False)}
    combinable = False  # A has another shape than a plain factor

    def applies(self, layer) -> bool:
        base = layer.get_base_layer()
        backend = quant.find_backend(base)
        if backend is not None and backend.name == BACKEND:
            return True
        warnings.warn(f"use_qalora=True adapts GPTQ layers only (as in HF PEFT); this {type(base).__name__} gets a "
                      "plain LoRA", PeftWarning, stacklevel=5)
        return False

    def init(self, layer, adapter_name: str, config, **kwargs: Any) -> None:
        group = config.qalora_group_size
        if layer.in_features % group:
            raise ValueError(f"QA-LoRA pools the input in groups of qalora_group_size={group}, which must divide "
                             f"in_features={layer.in_features} of {type(layer.get_base_layer()).__name__}")
        if layer.lora_bias[adapter_name]:
            raise ValueError("use_qalora=True cannot be combined with lora_bias=True; set lora_bias=False")
        layer.qalora_group_size[adapter_name] = group
        A = layer.lora_A[adapter_name].weight
        # a fresh nn.Linear, with its own default draw (as HF PEFT makes it)
        layer.lora_A[adapter_name] = nn.Linear(layer.in_features // group, A.shape[0], bias=False, device=A.device,
                                               dtype=A.dtype)

    def _pooled(self, layer, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        group = layer.qalora_group_size[adapter_name]
        groups = x.shape[-1] // group
        return x.reshape(*x.shape[:-1], groups, group).mean(dim=-1) * groups

    def forward(self, layer, x, result, adapter_name):
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.lora_dropout[adapter_name](layer._cast(x, A.weight))
        out = B(A(self._pooled(layer, x, adapter_name))) * layer.scaling[adapter_name]
        return result + out.to(result.dtype)

    def update_factors(self, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        group = layer.qalora_group_size[adapter_name]
        A = layer.lora_A[adapter_name].weight
        return A.repeat_interleave(group, dim=1) * (A.shape[1] / group), layer.lora_B[adapter_name].weight
