"""Multitask prompt tuning for peft-kernel: ``MultitaskPromptTuningConfig``,
``MultitaskPromptTuningInit`` and the prompt encoder ``MultitaskPromptEmbedding``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"MULTITASK_PROMPT_TUNING"``);
importing this module registers nothing by itself. It does not import torch: the encoder is
imported on first attribute access and registered as a lazy ``model_cls`` string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import MultitaskPromptTuningConfig, MultitaskPromptTuningInit

if TYPE_CHECKING:
    from .model import MultitaskPromptEmbedding

__all__ = ["MultitaskPromptEmbedding", "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit"]

__getattr__, __dir__ = lazy_attributes(__name__, {"MultitaskPromptEmbedding": ".model"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="multitask_prompt_tuning", config_cls=MultitaskPromptTuningConfig,
             model_cls="peft_plugin_multitask_prompt_tuning.model:MultitaskPromptEmbedding")
