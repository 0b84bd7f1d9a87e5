"""(IA)³ for peft-kernel: ``IA3Config``, ``IA3Model`` and the (IA)³ layers.

Found through the ``peft_kernel`` entry point ``ia3``; importing this module registers
nothing by itself.
"""

from __future__ import annotations

from torch import nn

from peft_kernel import hookimpl
from peft_kernel.dispatch import align_fan_in_fan_out, build_layer, is_linear_like

from .config import IA3Config
from .layer import Conv1d, Conv2d, Conv3d, IA3Layer, Linear
from .model import IA3Model

__all__ = ["IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv1d", "Conv2d", "Conv3d"]

PEFT_TYPE = "IA3"

#: built-in layers, checked in order
LAYERS = {
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.Conv1d: Conv1d,
}


@hookimpl
def peft_kernel_register_methods(register):
    register(name="ia3", config_cls=IA3Config, model_cls=IA3Model, prefix="ia3_", is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    if is_linear_like(target):  # nn.Linear, transformers Conv1D, quantized linear layers
        align_fan_in_fan_out(config, target)
        return build_layer(Linear, target, target_name, adapter_name, config)
    for layer_type, layer_cls in LAYERS.items():
        if isinstance(target, layer_type):
            return build_layer(layer_cls, target, target_name, adapter_name, config)
    return None
