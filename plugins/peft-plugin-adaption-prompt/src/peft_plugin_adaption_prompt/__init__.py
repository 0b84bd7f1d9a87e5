"""Adaption prompt (LLaMA-Adapter) for peft-kernel: ``AdaptionPromptConfig``,
``AdaptionPromptModel`` and the adapted attention layers.

Found through the ``peft_kernel`` entry point ``adaption_prompt`` (``peft_type``
``"ADAPTION_PROMPT"``); importing this module registers nothing by itself.

This is the entry-point module, so it does not import torch: the config is imported
eagerly (torch-free), the tuner and the layers on first attribute access (PEP 562), and
the method is registered with a lazy ``model_cls`` string.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import build_layer
from peft_kernel.lazy import lazy_attributes

from .config import AdaptionPromptConfig

if TYPE_CHECKING:
    from .layer import AdaptedAttention, FusedQKVAttention, RotaryAttention
    from .model import AdaptionPromptModel

__all__ = ["AdaptionPromptConfig", "AdaptionPromptModel", "AdaptedAttention", "RotaryAttention", "FusedQKVAttention"]

PEFT_TYPE = "ADAPTION_PROMPT"

#: public name -> defining submodule, imported on first access (they need torch)
_LAZY = {
    "AdaptionPromptModel": ".model",
    "AdaptedAttention": ".layer",
    "RotaryAttention": ".layer",
    "FusedQKVAttention": ".layer",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def peft_kernel_register_methods(register):
    register(name="adaption_prompt", config_cls=AdaptionPromptConfig,
             model_cls="peft_plugin_adaption_prompt.model:AdaptionPromptModel", prefix="adaption_")


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from .layer import attention_layer_class

    layer_cls = attention_layer_class(target)
    return None if layer_cls is None else build_layer(layer_cls, target, target_name, adapter_name, config)
