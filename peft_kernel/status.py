"""Parameter counts and adapter status reports (HF PEFT's TunerLayerStatus / TunerModelStatus)."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from torch import nn

from .auxiliary import ModulesToSaveWrapper
from .layer import AdapterLayer

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@dataclasses.dataclass
class TunerModelStatus:
    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


def _numel(param) -> int:
    n = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    if param.__class__.__name__ == "Params4bit":  # 4-bit weights pack two values per byte
        n = n * 2
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = total = 0
    for param in model.parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _unwrap(model):
    from .peft_model import PeftModel

    if isinstance(model, PeftModel):
        tuner = model.base_model
        if model._is_prompt_learning:  # base_model is the model itself
            return tuner, model
        return (tuner.model if hasattr(tuner, "model") else tuner), model
    return model, None


def _layer_items(module) -> dict[str, list]:
    items: dict[str, list] = {}
    if isinstance(module, ModulesToSaveWrapper):
        for name, sub in module.modules_to_save.items():
            items.setdefault(name, []).extend(sub.parameters())
        return items
    for attr in module.adapter_layer_names:
        for name, sub in getattr(module, attr).items():
            params = list(sub.parameters()) if isinstance(sub, nn.Module) else [sub]
            items.setdefault(name, []).extend(params)
    return items


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    inner, _ = _unwrap(model)
    result = []
    for name, module in inner.named_modules():
        if not isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            continue
        items = _layer_items(module)
        requires_grad: dict[str, Any] = {}
        devices: dict[str, list[str]] = {}
        for adapter, params in items.items():
            flags = {p.requires_grad for p in params}
            requires_grad[adapter] = flags.pop() if len(flags) == 1 else "irregular"
            devices[adapter] = sorted({p.device.type for p in params})
        result.append(TunerLayerStatus(
            name=name,
            module_type=repr(module).split("(")[0] if isinstance(module, AdapterLayer) else "ModulesToSaveWrapper",
            enabled=not module.disable_adapters,
            active_adapters=module.active_adapters,
            merged_adapters=list(module.merged_adapters),
            requires_grad=requires_grad,
            available_adapters=module._all_available_adapter_names(),
            devices=devices,
        ))
    return result


def _agree(values: list) -> Any:
    if not values:
        return []
    first = values[0]
    return first if all(v == first for v in values) else "irregular"


def get_model_status(model: nn.Module) -> TunerModelStatus:
    inner, peft_model = _unwrap(model)
    layers = get_layer_status(model)
    adapter_layers = [layer for layer in layers if layer.module_type != "ModulesToSaveWrapper"]
    trainable, total = count_parameters(model)
    requires_grad: dict[str, Any] = {}
    for layer in layers:
        for adapter, flag in layer.requires_grad.items():
            requires_grad[adapter] = flag if requires_grad.get(adapter, flag) == flag else "irregular"
    devices: dict[str, set] = {}
    for layer in layers:
        for adapter, devs in layer.devices.items():
            devices.setdefault(adapter, set()).update(devs)
    configs = peft_model.peft_config if peft_model is not None else getattr(inner, "peft_config", {})
    return TunerModelStatus(
        base_model_type=type(inner).__name__,
        adapter_model_type=type(model.base_model).__name__ if peft_model is not None else "None",
        peft_types={k: str(v.peft_type) for k, v in configs.items()},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(adapter_layers),
        enabled=_agree([layer.enabled for layer in layers]) if layers else False,
        active_adapters=_agree([sorted(layer.active_adapters) for layer in adapter_layers]),
        merged_adapters=_agree([sorted(layer.merged_adapters) for layer in adapter_layers]),
        requires_grad=requires_grad,
        available_adapters=sorted({a for layer in layers for a in layer.available_adapters}),
        devices={k: sorted(v) for k, v in devices.items()},
    )
