"""LoHa for peft-kernel: ``LoHaConfig``, ``LoHaModel`` and ``LoHaLayer``.

Found through the ``peft_kernel`` entry point ``loha``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import LoHaConfig

if TYPE_CHECKING:
    from .layer import LoHaLayer
    from .model import LoHaModel

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel"]

PEFT_TYPE = "LOHA"

__getattr__, __dir__ = lazy_attributes(__name__, {"LoHaModel": ".model", "LoHaLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="loha", config_cls=LoHaConfig, model_cls="peft_plugin_loha.model:LoHaModel", prefix="hada_",
             is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from torch import nn

    from .layer import LoHaLayer

    # one class for every layer kind: the kernel handles each kind's layout and operation
    return dispatch_method_layer(target, target_name, adapter_name, config, LoHaLayer,
                                 {nn.Conv1d: LoHaLayer, nn.Conv2d: LoHaLayer})
