"""P-tuning for peft-kernel: ``PromptEncoderConfig``, ``PromptEncoderReparameterizationType``
and the prompt encoder ``PromptEncoder``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"P_TUNING"``); importing
this module registers nothing by itself. It does not import torch: the encoder is imported on
first attribute access and registered as a lazy ``model_cls`` string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import PromptEncoderConfig, PromptEncoderReparameterizationType

if TYPE_CHECKING:
    from .model import PromptEncoder

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]

__getattr__, __dir__ = lazy_attributes(__name__, {"PromptEncoder": ".model"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="p_tuning", config_cls=PromptEncoderConfig, model_cls="peft_plugin_p_tuning.model:PromptEncoder")
