"""Choosing the adapter layer class for a target module.

Users add mappings with :func:`register_layer_mapping` (process-wide) or
``config.register_custom_module({...})`` (one config, never saved). Both are consulted
before any plugin. A method's own layers come last: from its ``trylast`` dispatch hook
(:func:`dispatch_method_layer` with a type table), or, with no hook, from the kernel, which
builds the tuner's ``layer_cls`` on the types it names (``BaseTuner.dispatch_types``).
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING

from .errors import PeftWarning

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the functions that need it: this module is loaded with the
# plugin registry, which must stay torch-free (``import peft_kernel`` and discovery).

_user_mappings: dict[str, dict[type, type]] = {}


def register_layer_mapping(layer_type: type, layer_cls: type, *, method: str) -> None:
    """Adapt modules of ``layer_type`` with ``layer_cls`` for method ``method``.

    ``layer_cls`` is built as ``layer_cls(target, adapter_name, config=config,
    **config.layer_kwargs(target_name))`` and must subclass :class:`AdapterLayer`.
    Mappings registered later for the same type replace earlier ones; they override
    the built-in layers of every plugin. Mappings are never saved with an adapter:
    register them again before loading.
    """
    from torch import nn

    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type must be an nn.Module subclass, got {layer_type!r}")
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, nn.Module)):
        raise TypeError(f"layer_cls must be an nn.Module subclass, got {layer_cls!r}")
    _user_mappings.setdefault(method.upper(), {})[layer_type] = layer_cls


def unregister_layer_mapping(layer_type: type, *, method: str) -> None:
    _user_mappings.get(method.upper(), {}).pop(layer_type, None)


def user_mappings(config) -> dict[type, type]:
    """Config-level custom modules first, then process-wide ones."""
    mapping = dict(getattr(config, "_custom_modules", None) or {})
    for layer_type, layer_cls in _user_mappings.get(config.peft_type, {}).items():
        mapping.setdefault(layer_type, layer_cls)
    return mapping


def build_layer(layer_cls, target, target_name, adapter_name, config):
    return layer_cls(target, adapter_name, config=config, **config.layer_kwargs(target_name))


def base_of(target: nn.Module) -> nn.Module:
    """The module whose type decides the layer class for ``target``: ``target`` itself, or,
    when ``target`` is already an adapter layer of another method (a mixed model), the
    module at the bottom of its ``base_layer`` chain. The new layer still wraps ``target``."""
    from .layer import unwrap_base_layer

    return unwrap_base_layer(target)


def dispatch_by_type(table, target, target_name, adapter_name, config):
    """Build the layer for the first ``isinstance`` match of :func:`base_of` ``(target)`` in
    ``table`` (an ordered ``{module_type: layer_cls}``), or return ``None``."""
    base = base_of(target)
    for layer_type, layer_cls in table.items():
        if isinstance(base, layer_type):
            return build_layer(layer_cls, target, target_name, adapter_name, config)
    return None


def transformers_conv1d():
    """transformers' ``Conv1D`` class if transformers is already imported, else ``None``
    (a model cannot hold one otherwise, and importing transformers is slow)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(utils, "Conv1D", None) if utils is not None else None


def stores_weight_transposed(module: nn.Module) -> bool:
    """Whether a linear-like layer keeps its weight as ``(in, out)`` (transformers
    ``Conv1D``, or a quantized layer that says so with ``is_transposed``)."""
    conv1d = transformers_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return True
    from . import quant

    return quant.is_quantized(module) and bool(getattr(module, "is_transposed", False))


def align_fan_in_fan_out(config, target: nn.Module) -> None:
    """Make ``config.fan_in_fan_out`` match the weight layout of ``target`` (with a warning)."""
    transposed = stores_weight_transposed(target)
    if getattr(config, "fan_in_fan_out", transposed) != transposed:
        layout = "(in, out)" if transposed else "(out, in)"
        warnings.warn(f"{type(target).__name__} stores its weight as {layout}; setting fan_in_fan_out={transposed}.",
                      PeftWarning, stacklevel=3)
        config.fan_in_fan_out = transposed


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (incl. subclasses), transformers Conv1D, or a quantized linear layer."""
    from torch import nn

    if isinstance(module, nn.Linear) or stores_weight_transposed(module):
        return True
    from . import quant

    return quant.is_quantized(module)


def dispatch_method_layer(target, target_name, adapter_name, config, linear_cls, table=None):
    """The usual built-in dispatch of a method: ``linear_cls`` for every linear-like layer
    (with ``fan_in_fan_out`` aligned to its layout), else the first ``isinstance`` match in
    ``table``, else ``None`` (types are those of :func:`base_of` ``(target)``)."""
    if linear_cls is not None and is_linear_like(base_of(target)):
        align_fan_in_fan_out(config, base_of(target))
        return build_layer(linear_cls, target, target_name, adapter_name, config)
    return dispatch_by_type(table or {}, target, target_name, adapter_name, config)


def dispatch_user_mapping(target, target_name, adapter_name, config):
    mapping = user_mappings(config)
    if not mapping:
        return None
    return dispatch_by_type(mapping, target, target_name, adapter_name, config)
