"""(IA)³ for peft-kernel: ``IA3Config``, ``IA3Model`` and the (IA)³ layers.

Found through the ``peft_kernel`` entry point ``ia3``; importing this module registers
nothing by itself.

This is the entry-point module, so it does not import torch: the config is imported
eagerly (torch-free), the tuner and the layers on first attribute access (PEP 562), and
the method is registered with a lazy ``model_cls`` string.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import IA3Config

if TYPE_CHECKING:
    from .layer import Conv1d, Conv2d, Conv3d, IA3Layer, Linear
    from .model import IA3Model

__all__ = ["IA3Config", "IA3Model", "IA3Layer", "Linear", "Conv1d", "Conv2d", "Conv3d"]

PEFT_TYPE = "IA3"

#: public name -> defining submodule, imported on first access (they need torch)
_LAZY = {
    "IA3Model": ".model",
    "IA3Layer": ".layer",
    "Linear": ".layer",
    "Conv1d": ".layer",
    "Conv2d": ".layer",
    "Conv3d": ".layer",
}


@functools.cache
def _builtin_layers() -> dict:
    """Built-in layers besides the linear-like ones, checked in order (``LAYERS``; built on
    first use, so importing this module does not import torch)."""
    from torch import nn

    from .layer import Conv1d, Conv2d, Conv3d

    return {nn.Conv2d: Conv2d, nn.Conv3d: Conv3d, nn.Conv1d: Conv1d}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, computed={"LAYERS": _builtin_layers})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="ia3", config_cls=IA3Config, model_cls="peft_plugin_ia3.model:IA3Model", prefix="ia3_",
             is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from .layer import Linear

    return dispatch_method_layer(target, target_name, adapter_name, config, Linear, _builtin_layers())
