"""OFT for peft-kernel: ``OFTConfig``, ``OFTModel`` and ``OFTLayer``.

Found through the ``peft_kernel`` entry point ``oft``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import OFTConfig

if TYPE_CHECKING:
    from .layer import OFTLayer
    from .model import OFTModel

__all__ = ["OFTConfig", "OFTLayer", "OFTModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"OFTModel": ".model", "OFTLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="oft", config_cls=OFTConfig, model_cls="peft_plugin_oft.model:OFTModel", prefix="oft_",
             is_mixed_compatible=True)

