"""LoRA-GA: LoRA initialised from the gradient (Wang et al., 2024, arXiv:2407.05000).

For a linear layer with weight W (out × in) and G the average gradient of the loss with respect
to W over a few batches of the task, take the top 2r singular components of G,

    G ≈ U diag(S) Vᵀ,

and give r of them to each factor: A = (rows of Vᵀ), B = (columns of U) · diag(S_B), scaled
(``LoraGAConfig.scale``). The first training steps of B A then point where full fine-tuning's
would; the base keeps ``W - scaling · B A``, so the model starts unchanged.

``preprocess_loraga(model, lora_config, train_step)`` runs ``train_step()`` (forward and backward
passes on sample data) with gradients on the target weights only, averages them per layer and
leaves them on the layers; ``get_peft_model(model, LoraConfig(init_lora_weights="lora_ga", ...))``
then builds the adapters from them. The gradients can be cached in a file (``cache_file``, HF
PEFT's layout: ``{"<layer>._peft_loraga_grad": G}``), read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn

from .corda import _load, _save, _usable
from .model import data_init_targets

#: attribute of a base layer that holds its averaged gradient until the adapter is built
GRAD_ATTR = "loraga_grad"
_CACHE_SUFFIX = "._peft_loraga_grad"


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config, train_step: Callable[[], None],
                      cache_file: str | os.PathLike | None = None) -> None:
    """Prepare every target layer of ``lora_config`` (nn.Linear or transformers Conv1D) for
    ``init_lora_weights="lora_ga"``: its weight's gradient averaged over the backward passes of
    ``train_step()``, which runs in training mode with gradients enabled for those weights only
    (the model's ``requires_grad`` flags and mode are restored after). With ``cache_file`` the
    gradients are read from it when it exists, else written to it."""
    if lora_config.lora_ga_config is None:
        raise ValueError("preprocess_loraga needs lora_config.lora_ga_config (a LoraGAConfig) and "
                         "init_lora_weights='lora_ga'")
    if lora_config.target_modules is None:
        from .model import DEFAULT_TARGETS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError("preprocess_loraga: set target_modules in the LoraConfig (no default targets for model "
                             f"type {model_type!r})")
        lora_config.target_modules = set(DEFAULT_TARGETS[model_type])
    targets = data_init_targets(model, lora_config, "LoRA-GA")
    if cache_file is not None and _usable(cache_file):
        cache = _load(cache_file, next(iter(model.parameters())).device)
        for name, module in targets:
            if name + _CACHE_SUFFIX not in cache:
                raise ValueError(f"LoRA-GA cache {os.fspath(cache_file)!r} has no gradient for layer {name!r}; was it "
                                 "built for this model and these targets?")
            setattr(module, GRAD_ATTR, cache[name + _CACHE_SUFFIX])
        return
    for name, gradient in estimate_gradients(model, targets, train_step).items():
        setattr(model.get_submodule(name), GRAD_ATTR, gradient)
    if cache_file is not None:
        _save({name + _CACHE_SUFFIX: getattr(module, GRAD_ATTR) for name, module in targets}, cache_file)


def estimate_gradients(model: nn.Module, targets: list[tuple[str, nn.Module]],
                       train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    """``{layer name: gradient of its weight}``, summed over ``train_step()``'s backward passes and
    divided by how many reached the layer."""
    flags = {param: param.requires_grad for param in model.parameters()}
    saved_grads = {module: module.weight.grad for _, module in targets}
    was_training = model.training
    passes = dict.fromkeys((name for name, _ in targets), 0)

    def counter(name):
        def hook(module, grad_input, grad_output):
            passes[name] += 1
        return hook

    handles = []
    try:
        for param in flags:
            param.requires_grad_(False)
        for name, module in targets:
            module.weight.grad = None
            module.weight.requires_grad_(True)
            handles.append(module.register_full_backward_hook(counter(name)))
        model.train()
        with torch.enable_grad():
            train_step()
        missing = [name for name, module in targets if passes[name] == 0 or module.weight.grad is None]
        if missing:
            raise ValueError(f"LoRA-GA: train_step() never back-propagated through {missing}; it should run forward "
                             "and backward passes (loss.backward()) on sample data")
        return {name: module.weight.grad.detach() / passes[name] for name, module in targets}
    finally:
        for handle in handles:
            handle.remove()
        for module, grad in saved_grads.items():
            module.weight.grad = grad
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(was_training)


def take_gradient(base_layer: nn.Module) -> torch.Tensor | None:
    """The gradient ``preprocess_loraga`` left on ``base_layer`` (removed from it), or ``None``."""
    gradient = getattr(base_layer, GRAD_ATTR, None)
    if gradient is not None:
        delattr(base_layer, GRAD_ATTR)
    return gradient


def lora_ga_factors(gradient: torch.Tensor, weight: torch.Tensor, r: int, scaling: float,
                    settings) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` (r × in, out × r) from the (out × in) ``gradient``; ``weight`` (out × in) is
    read by ``scale="weight_svd"``. Randomised SVDs draw from torch's global generator."""
    gradient = gradient.float()
    if gradient.shape != weight.shape:
        raise ValueError(f"LoRA-GA gradient has shape {tuple(gradient.shape)} but the layer's weight is "
                         f"{tuple(weight.shape)}: preprocess_loraga (or its cache_file) was run on another model")
    if 2 * r > min(gradient.shape):
        raise ValueError(f"LoRA-GA splits the top 2r = {2 * r} gradient components between A and B, but a "
                         f"{tuple(gradient.shape)} layer has only {min(gradient.shape)}; lower r for it (rank_pattern)")
    U, S, V = torch.svd_lowrank(gradient, q=min(4 * r, min(gradient.shape)), niter=4)
    U, S, Vh = U[:, : 2 * r], S[: 2 * r], V.T[: 2 * r]
    if settings.direction == "ArB2r":
        a_rows, b_cols = torch.arange(r), torch.arange(r, 2 * r)
    elif settings.direction == "A2rBr":
        a_rows, b_cols = torch.arange(r, 2 * r), torch.arange(r)
    elif settings.direction == "ArBr":
        a_rows, b_cols = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:  # "random": the same components for both
        a_rows = b_cols = torch.randperm(2 * r)[:r]
    A, S_B = Vh[a_rows], S[b_cols]
    B = U[:, b_cols] * S_B
    if settings.scale == "stable":
        B = B * (weight.shape[0] ** 0.25 / math.sqrt(settings.stable_gamma))
    elif settings.scale == "weight_svd":
        _, weight_S, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if S_B[0] > 0:
            B = B * (weight_S[0] / S_B[0])
    elif settings.scale == "gd_scale":
        A, B = A / scaling, B / scaling
    return A, B
