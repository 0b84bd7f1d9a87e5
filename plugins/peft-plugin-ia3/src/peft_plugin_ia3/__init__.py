"""(IA)³ for peft-kernel: ``IA3Config``, ``IA3Model`` and the (IA)³ layers.

Found through the ``peft_kernel`` entry point ``ia3``; importing this module registers
nothing by itself.
"""

from __future__ import annotations

from torch import nn

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer

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
    return dispatch_method_layer(target, target_name, adapter_name, config, Linear, LAYERS)
