"""LoRA for peft-kernel: ``LoraConfig``, ``LoraModel`` and the LoRA layers.

Registered through the ``peft_kernel`` entry point; importing this module registers
nothing by itself.

This is the entry-point module, so it does not import torch: the configs are imported
eagerly (torch-free), the tuner and the layers on first attribute access (PEP 562), and
the method is registered with a lazy ``model_cls`` string.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from . import trainable_tokens
from .config import ArrowConfig, CordaConfig, EvaConfig, LoftQConfig, LoraConfig, LoraGAConfig, LoraRuntimeConfig
from .variant_configs import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

if TYPE_CHECKING:
    from .arrow import create_arrow_model
    from .conversion import convert_to_lora, save_as_lora
    from .corda import preprocess_corda
    from .eva import get_eva_state_dict, initialize_lora_eva_weights
    from .hotswap import (
        check_hotswap_configs_compatible,
        hotswap_adapter,
        hotswap_adapter_from_state_dict,
        prepare_model_for_compiled_hotswap,
    )
    from .layer import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer, MultiheadAttention, ParamWrapper
    from .loftq import replace_lora_weights_loftq
    from .loraga import preprocess_loraga
    from .model import LoraModel
    from .optimizers import LoraFAOptimizer, create_lorafa_optimizer, create_loraplus_optimizer

__all__ = ["ArrowConfig", "LoraConfig", "LoraRuntimeConfig", "LoraModel", "LoraLayer", "Linear", "Embedding",
           "Conv1d", "Conv2d", "Conv3d", "MultiheadAttention", "ParamWrapper", "create_arrow_model",
           "check_hotswap_configs_compatible", "hotswap_adapter", "hotswap_adapter_from_state_dict",
           "prepare_model_for_compiled_hotswap", "LoftQConfig", "EvaConfig", "CordaConfig",
           "replace_lora_weights_loftq", "get_eva_state_dict", "initialize_lora_eva_weights", "preprocess_corda",
           "create_loraplus_optimizer", "create_lorafa_optimizer", "LoraFAOptimizer", "convert_to_lora",
           "save_as_lora", "KasaConfig", "BdLoraConfig", "VeloraConfig",
           "MontecloraConfig", "LoraGAConfig", "preprocess_loraga"]

#: public name -> defining submodule, imported on first access (they need torch)
_LAZY = {
    "LoraModel": ".model",
    "LoraLayer": ".layer",
    "Linear": ".layer",
    "Embedding": ".layer",
    "Conv1d": ".layer",
    "Conv2d": ".layer",
    "Conv3d": ".layer",
    "MultiheadAttention": ".layer",
    "ParamWrapper": ".layer",
    "create_arrow_model": ".arrow",
    "convert_to_lora": ".conversion",
    "save_as_lora": ".conversion",
    "check_hotswap_configs_compatible": ".hotswap",
    "hotswap_adapter": ".hotswap",
    "hotswap_adapter_from_state_dict": ".hotswap",
    "prepare_model_for_compiled_hotswap": ".hotswap",
    "replace_lora_weights_loftq": ".loftq",
    "get_eva_state_dict": ".eva",
    "initialize_lora_eva_weights": ".eva",
    "preprocess_corda": ".corda",
    "preprocess_loraga": ".loraga",
    "create_loraplus_optimizer": ".optimizers",
    "create_lorafa_optimizer": ".optimizers",
    "LoraFAOptimizer": ".optimizers",
}


@functools.cache
def _builtin_layers() -> dict:
    """Built-in layers besides the linear-like ones, checked in order (``LAYERS``; built on
    first use, so importing this module does not import torch)."""
    from torch import nn

    from .layer import Conv1d, Conv2d, Conv3d, Embedding, MultiheadAttention

    return {
        nn.Embedding: Embedding,
        nn.Conv2d: Conv2d,
        nn.Conv3d: Conv3d,
        nn.Conv1d: Conv1d,
        nn.MultiheadAttention: MultiheadAttention,
    }

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, computed={"LAYERS": _builtin_layers})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="lora", config_cls=LoraConfig, model_cls="peft_plugin_lora.model:LoraModel", prefix="lora_",
             is_mixed_compatible=True)


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != "LORA":
        return None
    from .layer import Linear

    return dispatch_method_layer(target, target_name, adapter_name, config, Linear, _builtin_layers())


@hookimpl
def peft_kernel_adapter_state_dict(model, config, adapter_name, state_dict):
    """DoRA magnitudes are saved without their ``.weight`` suffix; trainable token rows under HF's keys."""
    if config.peft_type != "LORA":
        return
    trainable_tokens.to_checkpoint_keys(config, state_dict)
    if not config.use_dora:
        return
    for key in [k for k in state_dict if k.endswith("lora_magnitude_vector.weight")]:
        state_dict[key[: -len(".weight")]] = state_dict.pop(key)

