"""LoRA for peft-kernel: ``LoraConfig``, ``LoraModel`` and the LoRA layers.

Registered through the ``peft_kernel`` entry point; importing this module registers
nothing by itself.
"""

from __future__ import annotations

from torch import nn

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer

from .config import LoraConfig, LoraRuntimeConfig
from .layer import Conv1d, Conv2d, Conv3d, Embedding, LoraLayer, Linear, MultiheadAttention
from .model import LoraModel

__all__ = ["LoraConfig", "LoraRuntimeConfig", "LoraModel", "LoraLayer", "Linear", "Embedding", "Conv1d", "Conv2d",
           "Conv3d", "MultiheadAttention"]

#: built-in layers besides the linear-like ones
LAYERS = {
    nn.Embedding: Embedding,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.Conv1d: Conv1d,
    nn.MultiheadAttention: MultiheadAttention,
}


@hookimpl
def peft_kernel_register_methods(register):
    register(name="lora", config_cls=LoraConfig, model_cls=LoraModel, prefix="lora_", is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != "LORA":
        return None
    return dispatch_method_layer(target, target_name, adapter_name, config, Linear, LAYERS)


@hookimpl
def peft_kernel_adapter_state_dict(model, config, adapter_name, state_dict):
    """DoRA magnitudes are saved without their ``.weight`` suffix."""
    if config.peft_type != "LORA" or not config.use_dora:
        return
    for key in [k for k in state_dict if k.endswith("lora_magnitude_vector.weight")]:
        state_dict[key[: -len(".weight")]] = state_dict.pop(key)
