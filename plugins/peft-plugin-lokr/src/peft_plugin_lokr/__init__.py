"""LoKr for peft-kernel: ``LoKrConfig``, ``LoKrModel`` and ``LoKrLayer``.

Found through the ``peft_kernel`` entry point ``lokr``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import LoKrConfig

if TYPE_CHECKING:
    from .layer import LoKrLayer
    from .model import LoKrModel

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"LoKrModel": ".model", "LoKrLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="lokr", config_cls=LoKrConfig, model_cls="peft_plugin_lokr.model:LoKrModel", prefix="lokr_",
             is_mixed_compatible=True)

