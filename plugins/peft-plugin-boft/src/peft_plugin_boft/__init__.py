"""BOFT for peft-kernel: ``BBOFTConfig``, ``BBOFTModel`` and ``BBOFTLayer``.

Found through the ``peft_kernel`` entry point ``boft``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import BOFTConfig

if TYPE_CHECKING:
    from .layer import BOFTLayer
    from .model import BOFTModel

__all__ = ["BOFTConfig", "BOFTLayer", "BOFTModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"BOFTModel": ".model", "BOFTLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="boft", config_cls=BOFTConfig, model_cls="peft_plugin_boft.model:BOFTModel", prefix="boft_")

