"""LoRA variants on linear layers, one module each, chosen by a ``LoraConfig`` field.

A variant changes how one adapter of a ``Linear`` LoRA layer starts, runs and merges;
everything else (dropout, scaling, bookkeeping, merge machinery, checkpoints) stays the
layer's. ``VARIANTS`` maps the config field to the variant; the layer keeps, per adapter,
the variant it was created with (``layer.variant[name]``) and defers to it in four places:
creation (:meth:`LoraVariant.applies`, :meth:`LoraVariant.init`), forward (:meth:`LoraVariant.forward`), the weight
update (:meth:`LoraVariant.update_factors`, which merging, unmerging and ``delta_weight``
use) and the questions other features ask (``combinable``, ``converts_to_lora``).

Per-adapter tensors a variant adds live in containers it declares in ``containers``; they
are created on a layer the first time it gets such an adapter, and are saved, loaded,
moved, frozen and deleted like ``lora_A`` / ``lora_B``.

DoRA, aLoRA and Arrow predate this table and are still wired into ``layer.py`` directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

#: config field -> "module:class" of the variant it switches on (imported on first use)
VARIANTS = {
    "kasa_config": "kasa:Kasa",
    "use_bdlora": "bdlora:BdLora",
    "velora_config": "velora:Velora",
    "monteclora_config": "monteclora:Monteclora",
    "use_qalora": "qalora:QaLora",
}


def variant_fields() -> tuple[str, ...]:
    return tuple(VARIANTS)


def resolve(config) -> LoraVariant | None:
    """The variant ``config`` asks for (``None``: plain LoRA). The config has checked that
    at most one is set."""
    for field, where in VARIANTS.items():
        if getattr(config, field, None):
            module, _, cls = where.partition(":")
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return None


class LoraVariant:
    """What a variant changes in a linear LoRA adapter. Stateless: per-adapter state lives
    in the layer, in the containers named by ``containers``."""

    #: the LoraConfig field that switches the variant on, and its name in messages
    field: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: attribute -> (container factory, trainable): per-adapter containers the variant adds to a
    #: layer (ModuleDict, ParameterDict, BufferDict, or dict for settings)
    containers: ClassVar[dict[str, tuple[Callable[[], nn.Module], bool]]] = {}
    #: whether add_weighted_adapter may combine such adapters factor by factor
    combinable: ClassVar[bool] = True
    #: whether the adapter is a plain LoRA delta on the unchanged base (convert_to_lora)
    converts_to_lora: ClassVar[bool] = True

    def applies(self, layer) -> bool:
        """Whether the variant adapts this layer (``False``: the layer gets plain LoRA)."""
        return True

    def init(self, layer, adapter_name: str, config, **kwargs: Any) -> None:
        """Called after ``lora_A`` / ``lora_B`` are made and initialised."""

    def update_factors(self, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as dense (r × in) and (out × r) matrices with update s·B·A (out × in)."""
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight

    def forward(self, layer, x: torch.Tensor, result: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``result`` (the base output) plus this adapter's output for ``x``; default plain LoRA."""
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.lora_dropout[adapter_name](layer._cast(x, A.weight))
        return result + (B(A(x)) * layer.scaling[adapter_name]).to(result.dtype)


def add_containers(layer, variant: LoraVariant) -> None:
    """Give ``layer`` the variant's containers (once), listed where the kernel looks for
    per-adapter state: trainable ones in ``adapter_layer_names``, others (modules holding
    buffers, plain dicts of settings) in ``other_param_names``."""
    for name, (factory, trainable) in variant.containers.items():
        if name in layer._modules or name in layer.__dict__:
            continue
        container = factory()
        if isinstance(container, nn.Module):
            layer._modules[name] = container
        else:
            layer.set_plain_attributes(**{name: container})
        listing = "adapter_layer_names" if trainable else "other_param_names"
        layer.set_plain_attributes(**{listing: (*getattr(layer, listing), name)})
