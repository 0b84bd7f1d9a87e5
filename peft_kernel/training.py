"""Preparing a (quantized) base model for adapter training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import quant


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Make a quantized model ready for adapter training (HF PEFT's function of the same name).

    Freezes every base parameter, upcasts the remaining half-precision float parameters
    (norms, embeddings, heads) to float32 for stable training when the model holds
    quantized layers, and, with ``use_gradient_checkpointing``, turns on gradient
    checkpointing with inputs that require grad (so checkpointed blocks still get
    gradients although the embeddings are frozen). With ``auto_clear_cache`` the accelerator's
    cached memory is released after the upcast (it holds the old half-precision copies).
    Returns the model.
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
        if auto_clear_cache:
            _empty_accelerator_cache()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        elif hasattr(model, "get_input_embeddings"):
            model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        if hasattr(model, "gradient_checkpointing_enable"):
            kwargs = {"use_reentrant": True} if gradient_checkpointing_kwargs is None else gradient_checkpointing_kwargs
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _empty_accelerator_cache() -> None:
    for backend in ("cuda", "xpu", "mps"):
        module = getattr(torch, backend, None)
        available = getattr(module, "is_available", None)
        if available is not None and available():
            module.empty_cache()


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of ``model`` to ``dtype`` (float16 / bfloat16) and the
    trainable ones to float32, for mixed-precision training: the base model takes half the
    memory while the adapter's updates keep full precision (HF PEFT's function)."""
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)
