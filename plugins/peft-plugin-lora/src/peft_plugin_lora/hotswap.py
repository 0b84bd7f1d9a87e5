"""Hot-swapping: replace a loaded LoRA adapter's weights in place with another checkpoint's.

No module is created or replaced and no Python-level state a compiled graph depends on
changes, so a model compiled with ``torch.compile`` runs the new adapter without
recompiling, provided

* the adapters were prepared with :func:`prepare_model_for_compiled_hotswap` before
  compiling: scalings become 0-d tensors (filled in place on a swap) and the factors are
  zero-padded to the largest rank to come (a smaller rank is copied into the padded factors,
  the rest stays zero, so B·A is unchanged);
* the new adapter targets the same layers or a subset (layers it leaves out get zero factors)
  and has a compatible config (:func:`check_hotswap_configs_compatible`).

Without compilation, a larger rank than the loaded one is swapped in as new tensors
(``torch.utils.swap_tensors``: the parameter objects stay the same).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn

from peft_kernel import PeftConfig, load_peft_weights
from peft_kernel.state_dict import adapter_tensors

from . import variants
from .layer import LoraLayer, ParamWrapper, _ConvNd

#: config fields that change outputs beyond the weights and the scaling, so they must agree
COMPATIBILITY_FIELDS = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "alora_invocation_tokens",
                        *variants.VARIANTS, "qalora_group_size")


def _peft_model(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile wrapper holds the model as _orig_mod


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(name, m) for name, m in _peft_model(model).named_modules() if isinstance(m, LoraLayer)]


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def check_hotswap_configs_compatible(config0: PeftConfig, config1: PeftConfig) -> None:
    """Raise ``ValueError`` unless an adapter with ``config1`` can be swapped in for one with
    ``config0``: both LoRA, equal ``COMPATIBILITY_FIELDS``."""
    if config0.peft_type != config1.peft_type or config0.peft_type != "LORA":
        raise ValueError(f"Hot-swapping replaces a LoRA adapter with a LoRA adapter; got {config0.peft_type} and "
                         f"{config1.peft_type}")
    first, second = config0.to_dict(), config1.to_dict()
    for key in COMPATIBILITY_FIELDS:
        if first.get(key) != second.get(key):
            raise ValueError(f"Configs are incompatible for hot-swapping: {key} is {first.get(key)!r} in the loaded "
                             f"adapter but {second.get(key)!r} in the new one. Load it as a new adapter instead.")


def prepare_model_for_compiled_hotswap(model: nn.Module, *, target_rank: int | None = None,
                                       config: PeftConfig | dict[str, PeftConfig] | None = None,
                                       check_compiled: Literal["error", "warn", "ignore"] = "error") -> None:
    """Make the loaded LoRA adapters hot-swappable under ``torch.compile``: scalings become 0-d
    tensors and, with ``target_rank``, every factor is zero-padded to that rank (the largest
    rank you will swap in). Call it after loading the first adapter and before compiling.
    ``config`` (a config or a dict of them) gets ``r`` and its ``rank_pattern`` ranks set to
    ``target_rank``, for building the next adapters with matching shapes.

    The padded factors keep the adapters' outputs (the extra rank is zero), but their saved
    shapes are padded too: save adapters before preparing, not after.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
    if _is_compiled(model):
        if check_compiled == "error":
            raise ValueError("prepare_model_for_compiled_hotswap must be called before torch.compile, not after")
        if check_compiled == "warn":
            import warnings

            warnings.warn("prepare_model_for_compiled_hotswap was called on a compiled model; expect a recompilation",
                          stacklevel=2)
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers: load the first adapter, then call "
                         "prepare_model_for_compiled_hotswap, then compile")
    if target_rank is not None:
        for name, layer in layers:  # check everything before changing anything
            _check_paddable(name, layer, target_rank)
    for _, layer in layers:
        device = layer.lora_A[next(iter(layer.lora_A))].weight.device if layer.lora_A else None
        for adapter, scaling in list(layer.scaling.items()):
            if not isinstance(scaling, torch.Tensor):
                layer.scaling[adapter] = torch.tensor(float(scaling), device=device)
        if target_rank is not None:
            for adapter in list(layer.r):
                _pad_factors(layer, adapter, target_rank)
        layer.adapter_state_changed()
    if config is not None and target_rank is not None:
        for each in config.values() if isinstance(config, dict) else [config]:
            each.r = target_rank
            each.rank_pattern = {key: target_rank for key in (each.rank_pattern or {})}


def _rank_dims(layer: LoraLayer, adapter: str) -> list[tuple[Any, str, int]]:
    """``(container, key, rank dim)`` of one adapter's factor tensors' owners."""
    if adapter in layer.lora_embedding_A:
        return [(layer.lora_embedding_A, adapter, 0), (layer.lora_embedding_B, adapter, 1)]
    if adapter in layer.lora_A:
        return [(layer.lora_A[adapter], "weight", 0), (layer.lora_B[adapter], "weight", 1)]
    return []


def _check_paddable(name: str, layer: LoraLayer, target_rank: int) -> None:
    for adapter, rank in layer.r.items():
        if rank > target_rank:
            raise ValueError(f"target_rank={target_rank} is smaller than the rank {rank} of adapter {adapter!r} in "
                             f"{name!r}; pass the largest rank of all adapters you will swap in")
        if rank == target_rank:
            continue
        if isinstance(layer, ParamWrapper) and layer.num_experts > 1:
            raise ValueError(f"{name!r} adapts a stack of experts, whose factors cannot be padded; give all adapters "
                             "the same rank there")
        if isinstance(layer, _ConvNd) and layer.get_base_layer().groups > 1:
            raise ValueError(f"{name!r} is a grouped convolution, whose factors cannot be padded")


def _pad_factors(layer: LoraLayer, adapter: str, target_rank: int) -> None:
    for owner, key, dim in _rank_dims(layer, adapter):
        tensor = owner[key] if isinstance(owner, nn.ParameterDict) else owner._parameters[key]
        if tensor.shape[dim] >= target_rank:
            continue
        shape = list(tensor.shape)
        shape[dim] = target_rank
        padded = tensor.new_zeros(shape)
        padded.narrow(dim, 0, tensor.shape[dim]).copy_(tensor.detach())
        padded = nn.Parameter(padded, requires_grad=tensor.requires_grad)
        if isinstance(owner, nn.ParameterDict):
            owner[key] = padded
            continue
        owner._parameters[key] = padded
        # keep the factor module's own size attributes true (Linear / Conv)
        for attr in (("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels")):
            if hasattr(owner, attr):
                setattr(owner, attr, target_rank)


def hotswap_adapter_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str,
                                    config: PeftConfig, parameter_prefix: str = "lora_") -> None:
    """Overwrite adapter ``adapter_name`` of ``model`` (a ``PeftModel``, compiled or not) in place
    with ``state_dict`` (checkpoint keys as in ``adapter_model.safetensors``, or the in-memory keys
    that name the adapter) and ``config``'s scalings. Everything is checked before anything
    changes: a tensor the loaded adapter does not have raises ``RuntimeError``; one that does
    not fit raises ``ValueError``."""
    peft_model = _peft_model(model)
    layers = _lora_layers(peft_model)
    if any(adapter_name in layer.merged_adapters for _, layer in layers):
        raise ValueError(f"Adapter {adapter_name!r} is merged into the base weights; unmerge_adapter() before "
                         "hot-swapping it")
    live = adapter_tensors(peft_model, adapter_name)
    new = {}
    for key, value in state_dict.items():
        key = key if key.startswith("base_model.") else "base_model.model." + key
        unnamed = key.replace(f".{adapter_name}.", ".", 1)  # the in-memory form: ...lora_A.<adapter>.weight
        new[key if key in live or unnamed not in live else unnamed] = value
    unexpected = sorted(k for k in new if k not in live)
    if unexpected:
        raise RuntimeError(f"Hot-swapping failed: the new adapter has tensors the loaded one lacks ({unexpected}); "
                           "load the adapter that targets the most layers first")
    stacks = {id(t) for _, layer in layers if isinstance(layer, ParamWrapper) and layer.num_experts > 1
              and adapter_name in layer.lora_A for t in (layer.lora_A[adapter_name].weight,
                                                         layer.lora_B[adapter_name].weight)}
    # a variant's tensors have structure (blocks, groups, a diagonal tied to a truncated base): no rank padding
    variant_of = {name: layer.variant[adapter_name].title for name, layer in layers if adapter_name in layer.variant}
    plan = []
    for key, value in new.items():
        old = live[key]
        if old.shape == value.shape:
            plan.append(("copy", old, value))
        elif key.split("." + parameter_prefix)[0] in variant_of:
            raise ValueError(f"{key} has shape {tuple(value.shape)} but the model holds {tuple(old.shape)}; "
                             f"{variant_of[key.split('.' + parameter_prefix)[0]]} adapters hot-swap only at equal "
                             "ranks")
        elif old.dim() == value.dim() and id(old) not in stacks and all(
                n <= o for n, o in zip(value.shape, old.shape, strict=True)):
            plan.append(("pad", old, value))
        elif _is_compiled(model) or id(old) in stacks:
            raise ValueError(f"{key} has shape {tuple(value.shape)} but the model holds {tuple(old.shape)}; for a "
                             "compiled model call prepare_model_for_compiled_hotswap(target_rank=<largest rank>) "
                             "before compiling (a stack of experts needs the same rank in both adapters)")
        else:
            plan.append(("swap", old, value))
    swapped = {key.split("." + parameter_prefix)[0] for key in new}  # module paths the new adapter adapts
    prefix = "base_model.model."
    scalings = []
    for name, layer in layers:
        if adapter_name in layer.r and name in swapped:
            kwargs = config.layer_kwargs(name[len(prefix):] if name.startswith(prefix) else name)
            scalings.append((layer, kwargs["r"], kwargs["lora_alpha"]))
    with torch.no_grad():
        for key in live:
            if key not in new:
                live[key].zero_()  # a layer the new adapter leaves out
        for action, old, value in plan:
            value = value.to(device=old.device, dtype=old.dtype)
            if action == "copy":
                old.copy_(value)
            elif action == "pad":
                old.zero_()
                old[tuple(slice(0, n) for n in value.shape)].copy_(value)
            else:
                torch.utils.swap_tensors(old, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    for layer, rank, alpha in scalings:
        layer.r[adapter_name], layer.lora_alpha[adapter_name] = rank, alpha
        layer.set_scaling(adapter_name, config.scaling_for(rank, alpha))
    tuner = peft_model.base_model
    if adapter_name in tuner.peft_config:
        config.inference_mode = tuner.peft_config[adapter_name].inference_mode
        tuner.peft_config[adapter_name] = config


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str, torch_device: str | None = None,
                    **kwargs: Any) -> None:
    """Replace the loaded adapter ``adapter_name`` of ``model`` with the one saved at
    ``model_name_or_path`` (a local directory), in place; the name stays. See the module
    docstring for what must hold; incompatible adapters raise before anything changes."""
    peft_model = _peft_model(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"No adapter {adapter_name!r} to swap; loaded: {sorted(peft_model.peft_config)}")
    subfolder = kwargs.get("subfolder")
    config = PeftConfig.from_pretrained(model_name_or_path, subfolder=subfolder)
    check_hotswap_configs_compatible(peft_model.peft_config[adapter_name], config)
    path = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
    weights = load_peft_weights(path, device=torch_device)
    hotswap_adapter_from_state_dict(model, weights, adapter_name, config)
