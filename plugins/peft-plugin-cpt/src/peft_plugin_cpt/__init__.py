"""Context-aware prompt tuning for peft-kernel: ``CPTConfig`` and the prompt encoder ``CPTEmbedding``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"CPT"``); importing this
module registers nothing by itself. It does not import torch: the encoder is imported on first
attribute access and registered as a lazy ``model_cls`` string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import CPTConfig

if TYPE_CHECKING:
    from .model import CPTEmbedding

__all__ = ["CPTConfig", "CPTEmbedding"]

__getattr__, __dir__ = lazy_attributes(__name__, {"CPTEmbedding": ".model"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="cpt", config_cls=CPTConfig, model_cls="peft_plugin_cpt.model:CPTEmbedding")
