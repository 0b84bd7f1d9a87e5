"""HRA for peft-kernel: ``BHRAConfig``, ``BHRAModel`` and ``BHRALayer``.

Found through the ``peft_kernel`` entry point ``hra``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import HRAConfig

if TYPE_CHECKING:
    from .layer import HRALayer
    from .model import HRAModel

__all__ = ["HRAConfig", "HRALayer", "HRAModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"HRAModel": ".model", "HRALayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="hra", config_cls=HRAConfig, model_cls="peft_plugin_hra.model:HRAModel", prefix="hra_")

