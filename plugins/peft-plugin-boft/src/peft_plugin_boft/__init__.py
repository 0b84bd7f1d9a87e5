"""BOFT for peft-kernel: ``BBOFTConfig``, ``BBOFTModel`` and ``BBOFTLayer``.

Found through the ``peft_kernel`` entry point ``boft``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import BOFTConfig

if TYPE_CHECKING:
    from .layer import BOFTLayer
    from .model import BOFTModel

__all__ = ["BOFTConfig", "BOFTLayer", "BOFTModel"]

PEFT_TYPE = "BOFT"

__getattr__, __dir__ = lazy_attributes(__name__, {"BOFTModel": ".model", "BOFTLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="boft", config_cls=BOFTConfig, model_cls="peft_plugin_boft.model:BOFTModel", prefix="boft_")


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from torch import nn

    from .layer import BOFTLayer

    # one class for every layer kind: the kernel handles each kind's layout and operation
    return dispatch_method_layer(target, target_name, adapter_name, config, BOFTLayer,
                                 {nn.Conv1d: BOFTLayer, nn.Conv2d: BOFTLayer, nn.Conv3d: BOFTLayer})
