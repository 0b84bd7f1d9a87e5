"""LoRA for peft-kernel: ``LoraConfig``, ``LoraModel`` and the LoRA layers.

Registered through the ``peft_kernel`` entry point; importing this module registers
nothing by itself.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

from peft_kernel import PeftWarning, hookimpl, quant
from peft_kernel.dispatch import build_layer

from .config import LoraConfig, LoraRuntimeConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, LoraLayer, Linear, MultiheadAttention
from .model import LoraModel

__all__ = ["LoraConfig", "LoraRuntimeConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d",
           "Conv3d", "MultiheadAttention"]

#: built-in layers, most specific first
LAYERS = {
    nn.Embedding: Embedding,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.Conv1d: Conv1d,
    nn.MultiheadAttention: MultiheadAttention,
    nn.Linear: Linear,
}


def _transformers_conv1d():
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


@hookimpl
def peft_kernel_register_methods(register):
    register(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_", is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != "LORA":
        return None
    for layer_type, layer_cls in LAYERS.items():
        if isinstance(target, layer_type):
            if layer_cls is Linear and config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out=True does not fit nn.Linear; using False.", PeftWarning)
                config.fan_in_fan_out = False
            return build_layer(layer_cls, target, target_name, adapter_name, config)
    conv1d = _transformers_conv1d()
    if (conv1d is not None and isinstance(target, conv1d)) or (
        quant.is_quantized(target) and getattr(target, "is_transposed", False)
    ):
        if not config.fan_in_fan_out:
            warnings.warn("transformers Conv1D stores weights as (in, out); using fan_in_fan_out=True.", PeftWarning)
            config.fan_in_fan_out = True
        return build_layer(Linear, target, target_name, adapter_name, config)
    if quant.is_quantized(target):
        return build_layer(Linear, target, target_name, adapter_name, config)
    return None


@hookimpl
def peft_kernel_adapter_state_dict(model, config, adapter_name, state_dict):
    """DoRA magnitudes are saved without their ``.weight`` suffix."""
    if config.peft_type != "LORA" or not config.use_dora:
        return
    for key in [k for k in state_dict if k.endswith("lora_magnitude_vector.weight")]:
        state_dict[key[: -len(".weight")]] = state_dict.pop(key)
