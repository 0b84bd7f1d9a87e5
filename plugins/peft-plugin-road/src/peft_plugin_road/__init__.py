"""RoAd for peft-kernel: ``RoadConfig``, ``RoadModel`` and ``RoadLayer``.

Found through the ``peft_kernel`` entry point ``road``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import RoadConfig

if TYPE_CHECKING:
    from .layer import RoadLayer
    from .model import RoadModel

__all__ = ["RoadConfig", "RoadLayer", "RoadModel"]

PEFT_TYPE = "ROAD"

__getattr__, __dir__ = lazy_attributes(__name__, {"RoadModel": ".model", "RoadLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="road", config_cls=RoadConfig, model_cls="peft_plugin_road.model:RoadModel", prefix="road_")


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from .layer import RoadLayer

    return dispatch_method_layer(target, target_name, adapter_name, config, RoadLayer)
