"""Prompt tuning for peft-kernel: ``PromptTuningConfig``, ``PromptTuningInit`` and the
prompt encoder ``PromptEmbedding``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"PROMPT_TUNING"``);
importing this module registers nothing by itself.

This is the entry-point module, so it does not import torch: the config is imported
eagerly (torch-free), the prompt encoder on first attribute access (PEP 562), and the
method is registered with a lazy ``model_cls`` string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import PromptTuningConfig, PromptTuningInit

if TYPE_CHECKING:
    from .model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]

#: public name -> defining submodule, imported on first access (they need torch)
_LAZY = {
    "PromptEmbedding": ".model",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def peft_kernel_register_methods(register):
    register(name="prompt_tuning", config_cls=PromptTuningConfig,
             model_cls="peft_plugin_prompt_tuning.model:PromptEmbedding")
