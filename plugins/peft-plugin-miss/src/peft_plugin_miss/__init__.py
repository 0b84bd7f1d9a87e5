"""MiSS for peft-kernel: ``MissConfig``, ``MissModel``, ``MissLayer`` and ``MissBatLayer``.

Found through the ``peft_kernel`` entry point ``miss``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layers are imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import MissConfig

if TYPE_CHECKING:
    from .layer import MissBatLayer, MissLayer
    from .model import MissModel

__all__ = ["MissBatLayer", "MissConfig", "MissLayer", "MissModel"]

PEFT_TYPE = "MISS"

__getattr__, __dir__ = lazy_attributes(__name__, {"MissModel": ".model", "MissLayer": ".layer",
                                                  "MissBatLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="miss", config_cls=MissConfig, model_cls="peft_plugin_miss.model:MissModel", prefix="miss_")


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from .layer import MissBatLayer, MissLayer

    layer_cls = MissBatLayer if config.init_weights == "bat" else MissLayer
    return dispatch_method_layer(target, target_name, adapter_name, config, layer_cls)
