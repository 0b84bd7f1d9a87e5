"""Trainable tokens for peft-kernel: ``TrainableTokensConfig``, ``TrainableTokensModel``, the layers,
and :func:`add_trainable_tokens` for methods that train token rows next to their own adapter.

Found through the ``peft_kernel`` entry point ``trainable_tokens``. This is the entry-point module,
so it does not import torch: the config is imported eagerly (torch-free), everything else on first
attribute access (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import TrainableTokensConfig

if TYPE_CHECKING:
    from .layer import TiedTrainableTokensLayer, TrainableTokensLayer
    from .model import TrainableTokensModel, add_trainable_tokens, input_embeddings_name

__all__ = [
    "TrainableTokensConfig", "TrainableTokensModel", "TrainableTokensLayer", "TiedTrainableTokensLayer",
    "add_trainable_tokens", "input_embeddings_name", "PREFIX",
]

PEFT_TYPE = "TRAINABLE_TOKENS"
#: the parameter-name prefix of the rows (a tuner that trains them next to its own adapter lists it)
PREFIX = "trainable_tokens_"

_LAZY = {
    "TrainableTokensModel": ".model",
    "add_trainable_tokens": ".model",
    "input_embeddings_name": ".model",
    "TrainableTokensLayer": ".layer",
    "TiedTrainableTokensLayer": ".layer",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def peft_kernel_register_methods(register):
    register(name="trainable_tokens", config_cls=TrainableTokensConfig,
             model_cls="peft_plugin_trainable_tokens.model:TrainableTokensModel", prefix=PREFIX)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from peft_kernel.dispatch import base_of

    from .layer import TrainableTokensLayer

    weight = getattr(base_of(target), "weight", None)
    if weight is None or weight.dim() != 2:
        return None  # the kernel names the module and what is supported
    return TrainableTokensLayer(target, adapter_name, config)
