"""Prompt tuning for peft-kernel: ``PromptTuningConfig``, ``PromptTuningInit`` and the
prompt encoder ``PromptEmbedding``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"PROMPT_TUNING"``);
importing this module registers nothing by itself.
"""

from __future__ import annotations

from peft_kernel import hookimpl

from .config import PromptTuningConfig, PromptTuningInit
from .model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]


@hookimpl
def peft_kernel_register_methods(register):
    register(name="prompt_tuning", config_cls=PromptTuningConfig, model_cls=PromptEmbedding)
