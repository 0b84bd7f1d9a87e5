"""RoAd for peft-kernel: ``RoadConfig``, ``RoadModel`` and ``RoadLayer``.

Found through the ``peft_kernel`` entry point ``road``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import RoadConfig

if TYPE_CHECKING:
    from .layer import RoadLayer
    from .model import RoadModel

__all__ = ["RoadConfig", "RoadLayer", "RoadModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"RoadModel": ".model", "RoadLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="road", config_cls=RoadConfig, model_cls="peft_plugin_road.model:RoadModel", prefix="road_")

