"""Training on several processes: wrap policies for FSDP, a sharding helper for FSDP2,
and the checks that keep checkpoint I/O and merging correct when parameters are sharded.

Nothing here depends on a method: an "adapter layer" is any :class:`AdapterLayer` (or
``modules_to_save`` wrapper), a "block" is a module class named in the model's
``_no_split_modules`` (transformers' list of layers that must stay on one device) or in
the ``FSDP_TRANSFORMER_CLS_TO_WRAP`` environment variable.

Sharded parameters come in three forms, all recognised by :func:`shard_reason`:

* ``DTensor`` -- FSDP2 (``fully_shard``) and tensor parallelism;
* flattened FSDP1 shards (``FullyShardedDataParallel``; the tensor carries
  ``_fsdp_flattened``);
* ZeRO-3 partitions (the tensor is empty locally; ``ds_numel`` holds its real size).

Checkpoint I/O gathers ``DTensor`` values itself (a collective: every rank must call
``save_pretrained``, with ``is_main_process`` telling which one writes) and refuses the
other two forms with a message saying how to pass a gathered state dict instead.
Merging refuses all three: a delta folded into a shard is lost or corrupts the weight.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable

import torch
from torch import nn

#: environment variable naming the block classes to wrap (comma-separated), as accelerate sets it
TRANSFORMER_CLS_ENV = "FSDP_TRANSFORMER_CLS_TO_WRAP"
#: module-name infix that FSDP1 wrappers insert
FSDP_INFIX = "_fsdp_wrapped_module."

MERGE_ADVICE = (
    "Merging into sharded weights would lose or corrupt the update. Save the adapter instead (every rank "
    "calls save_pretrained(dir, is_main_process=rank == 0), passing state_dict= a full state dict when the "
    "model is wrapped by FullyShardedDataParallel), then merge on one process into an unsharded base model: "
    "PeftModel.from_pretrained(base_model, dir).merge_and_unload(). Under ZeRO-3 you can also merge inside "
    "deepspeed.zero.GatheredParameters(model.parameters(), modifier_rank=0)."
)


# -- recognising sharded tensors -------------------------------------------------------------


def is_dtensor(tensor) -> bool:
    # no DTensor can exist before its module was imported, and importing it costs a second
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None)
    return cls is not None and isinstance(tensor, cls)


def shard_reason(tensor) -> str | None:
    """Why ``tensor`` is not a whole local tensor, or ``None`` when it is."""
    if not isinstance(tensor, torch.Tensor):
        return None
    if is_dtensor(tensor):
        placements = ", ".join(map(str, tensor.placements))
        return f"a DTensor sharded over a device mesh ({placements}; FSDP2 / tensor parallel)"
    if getattr(tensor, "_fsdp_flattened", False):
        return "flattened into a FullyShardedDataParallel shard"
    ds_numel = getattr(tensor, "ds_numel", None)
    if ds_numel is not None and tensor.numel() != ds_numel:
        return "partitioned by ZeRO-3 (not gathered)"
    return None


def sharded_parameter(module: nn.Module) -> tuple[str, str] | None:
    """``(name, reason)`` of the first sharded parameter of ``module``, or ``None``.

    A module whose FSDP1 wrapper took its parameters away (``use_orig_params=False``) is
    reported too: its name contains ``_fsdp_wrapped_module``.
    """
    for name, param in module.named_parameters():
        reason = shard_reason(param)
        if reason:
            return name, reason
    for name, sub in module.named_modules():
        if sub._modules.get("_fsdp_wrapped_module") is not None:
            return name or "<root>", "wrapped by FullyShardedDataParallel"
    return None


def merge_blocker(module: nn.Module) -> str | None:
    """Why adapters in ``module`` cannot be merged because of sharding (``None``: they can)."""
    found = sharded_parameter(module)
    if found is None:
        return None
    name, reason = found
    return f"parameter {name!r} is {reason}. {MERGE_ADVICE}"


def materialize(key: str, value: torch.Tensor | None, reason: str | None = None) -> torch.Tensor:
    """A whole local tensor for checkpoint ``key``: DTensors are gathered (collective),
    other sharded forms raise with what to do instead."""
    if is_dtensor(value):
        return value.detach().full_tensor()
    reason = reason or shard_reason(value)
    if reason:
        raise ValueError(
            f"Cannot read {key!r} for the checkpoint: the tensor is {reason}. Gather a full state dict and pass it "
            "as save_pretrained(..., state_dict=...) / get_peft_model_state_dict(model, state_dict=...): e.g. "
            "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True)) or FullyShardedDataParallel.state_dict_type(model, FULL_STATE_DICT); under "
            "ZeRO-3 call save_pretrained inside deepspeed.zero.GatheredParameters(model.parameters())."
        )
    return value


def load_into(key: str, current: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out like ``current``: a DTensor target gets a DTensor holding its local
    shard (no communication: every rank must load the same full value)."""
    check_loadable(key, current, value)
    if is_dtensor(current) and not is_dtensor(value):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=current.device, dtype=current.dtype)
        return distribute_tensor(value, current.device_mesh, current.placements, src_data_rank=None)
    return value


def check_loadable(key: str, current: torch.Tensor, value: torch.Tensor) -> None:
    """Raise when ``current`` is a shard that a full ``value`` cannot be copied into."""
    if is_dtensor(current):
        return
    reason = shard_reason(current)
    if reason and tuple(current.shape) != tuple(value.shape):
        raise ValueError(load_advice(key, reason))


def load_advice(key: str, reason: str) -> str:
    return (f"Cannot load {key!r}: the model's tensor is {reason}. Load the adapter before wrapping the model "
            "(PeftModel.from_pretrained(base, dir, is_trainable=True), then wrap), or under ZeRO-3 inside "
            "deepspeed.zero.GatheredParameters(params, modifier_rank=0). Models sharded with FSDP2 "
            "(fully_shard) can be loaded into directly.")


# -- what to wrap ------------------------------------------------------------------------------


def module_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module`` (relative to it) read from its parameters and persistent
    buffers, without FSDP1 infixes and without running state-dict hooks (which gather).
    An FSDP1 flat parameter (``use_orig_params=False``) stands for the parameters it holds."""
    keys: list[str] = []
    for name, param in module.named_parameters():
        prefix, _, _ = name.rpartition(".")
        fqns = getattr(param, "_fqns", None)
        if fqns is not None:
            keys += [f"{prefix}.{fqn}" if prefix else fqn for fqn in fqns]
        else:
            keys.append(name)
    for path, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                keys.append(f"{path}.{name}" if path else name)
    return list(dict.fromkeys(k.replace(FSDP_INFIX, "") for k in keys))


def _no_split_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return names


def block_classes(model: nn.Module, names: Iterable[str] | None = None) -> set[type]:
    """Classes of the model's repeated blocks.

    ``names`` (class names) win; else ``$FSDP_TRANSFORMER_CLS_TO_WRAP`` (comma-separated);
    names given either way must exist in the model (every class of that name counts). Else
    the ``_no_split_modules`` of the model and its submodules, keeping those that occur (a
    custom model without any gives an empty set, not an error).
    """
    explicit = list(names) if names is not None else None
    if explicit is None and os.environ.get(TRANSFORMER_CLS_ENV):
        explicit = [n.strip() for n in os.environ[TRANSFORMER_CLS_ENV].split(",") if n.strip()]
    wanted = explicit if explicit is not None else _no_split_names(model)
    by_name: dict[str, set[type]] = {}
    for module in model.modules():
        by_name.setdefault(type(module).__name__, set()).add(type(module))
    if explicit is not None:
        missing = [n for n in explicit if n not in by_name]
        if missing:
            source = "block class names" if names is not None else f"${TRANSFORMER_CLS_ENV}"
            raise ValueError(f"{source} names {missing}, which are not module classes of this model; "
                             f"classes present include {sorted(by_name)[:20]}")
    return {cls for n in wanted for cls in by_name.get(n, ())}


def _prompt_encoder_classes(model: nn.Module) -> set[type]:
    encoders = getattr(model, "_modules", {}).get("prompt_encoder")
    return {type(m) for m in encoders.values()} if isinstance(encoders, nn.ModuleDict) else set()


def _has_trainable_weight(module: nn.Module) -> bool:
    if next(module.children(), None) is not None:
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.requires_grad


def fsdp_auto_wrap_policy(model: nn.Module, transformer_layer_cls_names: Iterable[str] | None = None):
    """An ``auto_wrap_policy`` for ``FullyShardedDataParallel`` (FSDP1) of a PEFT model.

    Wraps, each in its own FSDP unit: every leaf module with a trainable ``weight`` (the
    adapter's own layers, so trainable and frozen parameters never share a flat
    parameter -- required with ``use_orig_params=False``); the model's blocks (see
    :func:`block_classes`); and prompt encoders. Works on any ``nn.Module``.
    """
    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    classes = block_classes(model, transformer_layer_cls_names) | _prompt_encoder_classes(model)
    policies = [functools.partial(lambda_auto_wrap_policy, lambda_fn=_has_trainable_weight)]
    if classes:
        policies.append(functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes))
    return functools.partial(_or_policy, policies=policies)


def _adapter_units(model: nn.Module) -> list[nn.Module]:
    from .auxiliary import ModulesToSaveWrapper
    from .layer import AdapterLayer

    units, owners = [], []
    for name, module in model.named_modules():
        if any(name.startswith(o) for o in owners):
            continue
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            owners.append(name + ".")
            units.append(module)
    return units


def fully_shard_model(model: nn.Module, transformer_layer_cls_names: Iterable[str] | None = None,
                      **fully_shard_kwargs) -> nn.Module:
    """Shard a PEFT model with FSDP2 (``torch.distributed.fsdp.fully_shard``), in place.

    Each block (see :func:`block_classes`) that holds adapter layers becomes one FSDP
    unit; without blocks (a custom model) each outermost adapter layer does; prompt
    encoders do; the model itself is the root unit. FSDP2 shards parameter by parameter,
    so trainable and frozen parameters may share a unit. Keyword arguments (``mesh``,
    ``reshard_after_forward``, ``mp_policy``, ...) go to every ``fully_shard`` call.
    Returns ``model`` (its class is now FSDP2's subclass of the original).
    """
    from torch.distributed.fsdp import fully_shard

    from .layer import AdapterLayer

    classes = block_classes(model, transformer_layer_cls_names)
    units = [m for m in model.modules() if type(m) in classes
             and any(isinstance(s, AdapterLayer) for s in m.modules())]
    if not units:
        units = _adapter_units(model)
    units += [m for m in model.modules() if type(m) in _prompt_encoder_classes(model)]
    for module in reversed(units):  # innermost first: fully_shard skips parameters already sharded
        fully_shard(module, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
