"""HRA for peft-kernel: ``BHRAConfig``, ``BHRAModel`` and ``BHRALayer``.

Found through the ``peft_kernel`` entry point ``hra``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import HRAConfig

if TYPE_CHECKING:
    from .layer import HRALayer
    from .model import HRAModel

__all__ = ["HRAConfig", "HRALayer", "HRAModel"]

PEFT_TYPE = "HRA"

__getattr__, __dir__ = lazy_attributes(__name__, {"HRAModel": ".model", "HRALayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="hra", config_cls=HRAConfig, model_cls="peft_plugin_hra.model:HRAModel", prefix="hra_")


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from torch import nn

    from .layer import HRALayer

    # one class for every layer kind: the kernel handles each kind's layout and operation
    return dispatch_method_layer(target, target_name, adapter_name, config, HRALayer,
                                 {nn.Conv1d: HRALayer, nn.Conv2d: HRALayer, nn.Conv3d: HRALayer})
