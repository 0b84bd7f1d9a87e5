"""Prompt tuning for peft-kernel: ``PromptTuningConfig``, ``PromptTuningInit`` and the
prompt encoder ``PromptEmbedding``.

Registered through the ``peft_kernel`` entry point (``peft_type`` ``"PROMPT_TUNING"``);
importing this module registers nothing by itself.

This is the entry-point module, so it does not import torch: the config is imported
eagerly (torch-free), the prompt encoder on first attribute access (PEP 562), and the
method is registered with a lazy ``model_cls`` string.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from peft_kernel import hookimpl

from .config import PromptTuningConfig, PromptTuningInit

if TYPE_CHECKING:
    from .model import PromptEmbedding

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]

#: public name -> submodule, imported on first access (it needs torch)
_LAZY = {"PromptEmbedding": "model"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


@hookimpl
def peft_kernel_register_methods(register):
    register(name="prompt_tuning", config_cls=PromptTuningConfig,
             model_cls="peft_plugin_prompt_tuning.model:PromptEmbedding")
