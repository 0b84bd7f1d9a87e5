"""Prefix tuning for peft-kernel: ``PrefixTuningConfig`` and the prompt encoder ``PrefixEncoder``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"PREFIX_TUNING"``);
importing this module registers nothing by itself. It does not import torch: the encoder is
imported on first attribute access and registered as a lazy ``model_cls`` string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import PrefixTuningConfig

if TYPE_CHECKING:
    from .model import PrefixEncoder

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]

__getattr__, __dir__ = lazy_attributes(__name__, {"PrefixEncoder": ".model"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="prefix_tuning", config_cls=PrefixTuningConfig,
             model_cls="peft_plugin_prefix_tuning.model:PrefixEncoder")
