"""(IA)³ for peft-kernel: ``IA3Config``, ``IA3Model`` and the (IA)³ layers.

Found through the ``peft_kernel`` entry point ``ia3``; importing this module registers
nothing by itself.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

from peft_kernel import PeftWarning, hookimpl, quant
from peft_kernel.dispatch import build_layer

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
    nn.Linear: Linear,
}


def _transformers_conv1d():
    utils = sys.modules.get("transformers.pytorch_utils")  # never import transformers ourselves
    return getattr(utils, "Conv1D", None) if utils is not None else None


def _set_fan_in_fan_out(config, value: bool, why: str) -> None:
    if config.fan_in_fan_out != value:
        warnings.warn(f"{why}; setting fan_in_fan_out={value}.", PeftWarning, stacklevel=4)
        config.fan_in_fan_out = value


@hookimpl
def peft_kernel_register_methods(register):
    register(name="ia3", config_cls=IA3Config, model_cls=IA3Model, prefix="ia3_", is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    for layer_type, layer_cls in LAYERS.items():
        if isinstance(target, layer_type):
            if layer_cls is Linear:
                _set_fan_in_fan_out(config, False, "nn.Linear stores its weight as (out, in)")
            return build_layer(layer_cls, target, target_name, adapter_name, config)
    conv1d = _transformers_conv1d()
    if (conv1d is not None and isinstance(target, conv1d)) or (
        quant.is_quantized(target) and getattr(target, "is_transposed", False)
    ):
        _set_fan_in_fan_out(config, True, "transformers Conv1D stores its weight as (in, out)")
        return build_layer(Linear, target, target_name, adapter_name, config)
    if quant.is_quantized(target):
        return build_layer(Linear, target, target_name, adapter_name, config)
    return None
