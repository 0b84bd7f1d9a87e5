"""Preparing a (quantized) base model for adapter training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import quant


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Make a quantized model ready for adapter training (HF PEFT's function of the same name).

    Freezes every base parameter, upcasts the remaining half-precision float parameters
    (norms, embeddings, heads) to float32 for stable training when the model holds
    quantized layers, and, with ``use_gradient_checkpointing``, turns on gradient
    checkpointing with inputs that require grad (so checkpointed blocks still get
    gradients although the embeddings are frozen). Returns the model.
    """
    quantized = any(quant.is_quantized(m) for m in model.modules()) or getattr(model, "is_quantized", False) \
        or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    for param in model.parameters():
        param.requires_grad_(False)
    if quantized:
        quantized_params = {id(p) for m in model.modules() if quant.is_quantized(m) for p in m.parameters()}
        for param in model.parameters():
            if id(param) not in quantized_params and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        if hasattr(model, "gradient_checkpointing_enable"):
            kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
