"""LoHa for peft-kernel: ``LoHaConfig``, ``LoHaModel`` and ``LoHaLayer``.

Found through the ``peft_kernel`` entry point ``loha``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import LoHaConfig

if TYPE_CHECKING:
    from .layer import LoHaLayer
    from .model import LoHaModel

__all__ = ["LoHaConfig", "LoHaLayer", "LoHaModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"LoHaModel": ".model", "LoHaLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="loha", config_cls=LoHaConfig, model_cls="peft_plugin_loha.model:LoHaModel", prefix="hada_",
             is_mixed_compatible=True)

