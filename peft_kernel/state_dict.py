"""Checkpoint I/O in HF PEFT's format, for every method.

Keys are selected structurally: every tensor an adapter layer keeps for the adapter
(its containers named in ``adapter_layer_names`` / ``other_param_names``), every
``modules_to_save`` copy, and the tuner's shared buffers. In memory a key carries the
adapter name (``lin.foo_A.default.weight``); on disk it does not (``lin.foo_A.weight``)
and every key starts with ``base_model.model.``. Loading uses the inverse of the very
same mapping, so save and load can never disagree.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from . import distributed, io
from .auxiliary import ModulesToSaveWrapper
from .errors import PeftWarning, StateDictMismatchError
from .layer import AdapterLayer, BufferDict
from .plugins import manager

WEIGHTS_NAME = "adapter_model.bin"
SAFETENSORS_WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_PREFIX = "base_model.model."
FSDP_INFIX = distributed.FSDP_INFIX


def _tuner_and_config(model, adapter_name):
    """``(holder, config)``: the holder is a PeftModel's tuner, or the model itself when the
    adapter was injected in place (``inject_adapter_in_model``, which transformers' and
    diffusers' adapter APIs use)."""
    from .peft_model import PeftModel

    tuner = model.base_model if isinstance(model, PeftModel) else model
    configs = getattr(model, "peft_config", None) or getattr(tuner, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {sorted(configs)}")
    return tuner, configs[adapter_name]


def _layers_and_prefix(model, tuner) -> tuple[nn.Module, str]:
    """The module holding the adapter layers, and the checkpoint-key prefix of its paths: keys of
    a PeftModel start with ``base_model.model.``, those of a model adapted in place do not."""
    return (model, "") if tuner is model else (tuner.model, MODEL_PREFIX)


def key_map(model, adapter_name: str = "default") -> dict[str, str]:
    """``{in-memory key: checkpoint key}`` for one adapter of a PeftModel.

    In-memory keys are module paths as they are (FSDP1 wrappers add ``_fsdp_wrapped_module.``
    segments); checkpoint keys never carry those segments.
    """
    tuner, config = _tuner_and_config(model, adapter_name)
    if config.is_prompt_learning:
        return model.prompt_learning.key_map(adapter_name)
    inner, prefix = _layers_and_prefix(model, tuner)
    mapping: dict[str, str] = {}
    owners: list[str] = []
    saved_path = _saved_path_function(inner, adapter_name)
    for path, module in inner.named_modules():
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_layer_names + module.other_param_names:
                container = getattr(module, attr, None)
                if not isinstance(container, (nn.ModuleDict, nn.ParameterDict, BufferDict)):
                    continue
                if adapter_name not in container:
                    continue
                if isinstance(container, BufferDict) and not container.persistent:
                    continue
                item = container[adapter_name]
                base, saved = f"{path}.{attr}", f"{saved_path(path)}.{attr}"
                if isinstance(item, nn.Module):
                    for sub in _module_keys(item):
                        mapping[f"{prefix}{base}.{adapter_name}.{sub}"] = f"{prefix}{saved}.{sub}"
                else:
                    mapping[f"{prefix}{base}.{adapter_name}"] = f"{prefix}{saved}"
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            if any(path.startswith(o) for o in owners):
                continue
            owners.append(path + ".")
            for sub in _module_keys(module.modules_to_save[adapter_name]):
                mapping[f"{prefix}{path}.modules_to_save.{adapter_name}.{sub}"] = f"{prefix}{saved_path(path)}.{sub}"
    for attr in getattr(tuner, "shared_buffer_names", ()):
        container = getattr(tuner, attr, None)
        if container is not None and adapter_name in container:
            mapping[f"base_model.{attr}.{adapter_name}"] = f"base_model.{attr}"
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for name, _ in inner.named_parameters():
            if name.endswith(".bias") or name == "bias":
                key = f"{prefix}{name}"
                if ".modules_to_save." not in name and ".original_module." not in name and key not in mapping:
                    mapping[key] = f"{prefix}{saved_path(name)}"
    elif isinstance(bias, str) and bias.endswith("_only"):
        for path, module in inner.named_modules():
            if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name):
                base = module.get_base_layer()
                if getattr(base, "bias", None) is not None:
                    full = path + ".base_layer" * _depth(module) + ".bias"
                    mapping[f"{prefix}{full}"] = f"{prefix}{saved_path(full)}"
    if any(FSDP_INFIX in k for k in mapping):
        mapping = {k: v.replace(FSDP_INFIX, "") for k, v in mapping.items()}
    return mapping


def _saved_path_function(inner: nn.Module, adapter_name: str):
    """``path -> path in the checkpoint`` for one adapter. In a mixed model a module can hold
    a chain of adapter layers, one per method (each the ``base_layer`` of the one around it);
    the ``base_layer`` steps through layers that do not hold the adapter are left out, so each
    adapter is saved exactly as a model of its own method alone would save it."""
    layers = {path: module for path, module in inner.named_modules() if isinstance(module, AdapterLayer)}
    passed = set()
    for path, layer in layers.items():
        if path.endswith(".base_layer") and path[: -len(".base_layer")] in layers:
            continue  # not the outermost layer of its chain
        chain = [layer]
        while isinstance(chain[-1].base_layer, AdapterLayer):
            chain.append(chain[-1].base_layer)
        if len(chain) > 1:
            passed.update(path + ".base_layer" * (depth + 1) for depth, link in enumerate(chain)
                          if not link.has_adapter(adapter_name))
    if not passed:
        return lambda path: path

    def saved_path(path: str) -> str:
        parts = path.split(".")
        return ".".join(part for i, part in enumerate(parts) if ".".join(parts[: i + 1]) not in passed)

    return saved_path


def _module_keys(module: nn.Module):
    """The state-dict keys of ``module``; read from its parameters and persistent buffers
    when it is sharded, so that no state-dict hook runs (hooks of sharding frameworks
    gather, and a gather that not every rank makes deadlocks)."""
    if distributed.sharded_parameter(module) is None:
        return module.state_dict().keys()
    return distributed.module_keys(module)


def _depth(module: AdapterLayer) -> int:
    depth = 0
    while isinstance(module, AdapterLayer):
        module, depth = module.base_layer, depth + 1
    return depth


def _normalise(state_dict: dict[str, Any]) -> dict[str, Any]:
    if any(FSDP_INFIX in k for k in state_dict):
        return {k.replace(FSDP_INFIX, ""): v for k, v in state_dict.items()}
    return state_dict


def get_peft_model_state_dict(model, state_dict: dict | None = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers="auto") -> dict[str, torch.Tensor]:
    """The adapter's tensors under their checkpoint keys (no adapter name; HF PEFT format).

    Pass ``state_dict`` to read the values from it instead of the live model (e.g. a
    full state dict gathered from FSDP; ``_fsdp_wrapped_module.`` infixes are ignored).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    tuner, config = _tuner_and_config(model, adapter_name)
    mapping = key_map(model, adapter_name)
    for key in _embedding_keys(model, config, save_embedding_layers):
        mapping.setdefault(key, key)
    if state_dict is None:
        values = _live_tensors(model, mapping)
    else:
        state_dict = _normalise(state_dict)
        values = {k: state_dict[k.replace(FSDP_INFIX, "")] for k in mapping if k.replace(FSDP_INFIX, "") in state_dict}
    result = {mapping[k]: distributed.materialize(mapping[k], v) for k, v in values.items()}
    if config.is_prompt_learning:
        result.update(model.prompt_learning.computed_checkpoint_tensors(adapter_name))
        return result
    manager().adapter_state_dict(model=tuner, config=config, adapter_name=adapter_name, state_dict=result)
    return result


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_keys(model, config, save_embedding_layers) -> list[str]:
    """Full embedding weights saved next to the adapter (HF PEFT's ``save_embedding_layers``).

    ``"auto"`` saves them when an embedding layer is targeted. (HF PEFT also compares the
    vocabulary size with the base model's config, which may need the network; that check
    is not made here: pass ``True`` after resizing embeddings.)
    """
    import re

    from . import targeting

    targets = getattr(config, "target_modules", None)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    targeted = False
    if isinstance(targets, str) and targets != targeting.ALL_LINEAR:
        targeted = any(re.fullmatch(targets, name) for name, _ in inner.named_modules()
                       if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES))
    elif targets:
        targeted = any(name in targets for name in EMBEDDING_LAYER_NAMES)
    if save_embedding_layers == "auto":
        partial = not config.saves_targeted_embeddings or getattr(config, "trainable_token_indices", None) is not None
        if not targeted or partial:
            return []
        warnings.warn("Setting `save_embedding_layers` to True because embedding layers are in target_modules.",
                      PeftWarning, stacklevel=3)
        save_embedding_layers = True
    if not save_embedding_layers or not hasattr(inner, "get_input_embeddings"):
        return []
    keys = []
    prefix = MODEL_PREFIX if hasattr(model, "get_base_model") else ""
    for layer in (inner.get_input_embeddings(), inner.get_output_embeddings()):
        if layer is None:
            continue
        module = layer
        if targeted:
            if not isinstance(layer, AdapterLayer):
                continue
            module = layer.base_layer
        for name, candidate in inner.named_modules():
            if candidate is module:
                keys += [f"{prefix}{name}.{p}" for p, _ in module.named_parameters()]
                break
    return keys


def _live_tensors(model, mapping) -> dict[str, torch.Tensor]:
    """Look the mapped tensors up without building the whole model's state dict."""
    full = {}
    root = model
    for key in mapping:
        try:
            full[key] = _lookup(root, key)
        except KeyError:
            found = distributed.sharded_parameter(root)
            if found is None:
                raise
            distributed.materialize(key, None, reason=found[1])
    return full


def _lookup(root: nn.Module, key: str) -> torch.Tensor:
    module_path, _, name = key.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if name in module._parameters:
        return module._parameters[name]
    if name in module._buffers:
        return module._buffers[name]
    if isinstance(module, nn.ParameterDict):
        return module[name]
    raise KeyError(key)


def save_key_map(model, adapter_name: str) -> dict[str, str]:
    """``{checkpoint key: in-memory key}``, with the plugins' save-time renames applied."""
    tuner, config = _tuner_and_config(model, adapter_name)
    mapping = key_map(model, adapter_name)
    saved = {disk: mem for mem, disk in mapping.items()}
    if not config.is_prompt_learning:
        manager().adapter_state_dict(model=tuner, config=config, adapter_name=adapter_name, state_dict=saved)
    return saved


def adapter_tensors(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The live tensors of one adapter (its parameters and saved buffers themselves, not
    copies) under their checkpoint keys, the plugins' renames applied: the keys of
    ``adapter_model.safetensors``. Writing into them changes the adapter in place (e.g. to
    swap in another checkpoint without building new modules)."""
    return {disk: _lookup(model, mem) for disk, mem in save_key_map(model, adapter_name).items()}


def set_peft_model_state_dict(model, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """Load checkpoint tensors into an existing adapter; returns ``(missing_keys, unexpected_keys)``.

    Nothing is changed unless every tensor fits: a shape mismatch raises (or, with
    ``ignore_mismatched_sizes``, skips that tensor with a warning).
    """
    tuner, config = _tuner_and_config(model, adapter_name)
    state = dict(peft_model_state_dict)
    inner, prefix = (None, "") if config.is_prompt_learning else _layers_and_prefix(model, tuner)
    if config.is_prompt_learning:  # keys carry no prefix (prompt_embeddings, base_model.<head>...)
        state = _normalise(state)
    elif prefix:
        state = {k if k.startswith("base_model.") else MODEL_PREFIX + k: v for k, v in _normalise(state).items()}
    else:  # adapted in place: keys are the model's own paths (a PeftModel's checkpoint fits too)
        state = {k.removeprefix(MODEL_PREFIX): v for k, v in _normalise(state).items()}
    if not config.is_prompt_learning:
        manager().load_state_dict(model=tuner, config=config, adapter_name=adapter_name, state_dict=state)
    wanted = save_key_map(model, adapter_name)
    assignments: list[tuple[str, torch.Tensor]] = []
    unexpected, mismatched = [], []
    for disk_key, value in state.items():
        mem_key = wanted.get(disk_key)
        if mem_key is None and _exists(model, disk_key):
            mem_key = disk_key  # e.g. saved biases or embedding weights, stored under their own names
        if mem_key is None:
            unexpected.append(disk_key)
            continue
        try:
            target = _lookup(model, mem_key)
        except KeyError:
            found = distributed.sharded_parameter(model)
            if found is None:
                raise
            raise ValueError(distributed.load_advice(disk_key, found[1])) from None
        distributed.check_loadable(disk_key, target, value)
        if tuple(target.shape) != tuple(value.shape):
            mismatched.append((disk_key, tuple(value.shape), tuple(target.shape)))
            continue
        assignments.append((mem_key, value))
    if mismatched:
        lines = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched)
        if not ignore_mismatched_sizes:
            raise StateDictMismatchError(
                f"Size mismatch while loading adapter {adapter_name!r}: {lines}. The adapter was saved for a "
                "different model or config; nothing was loaded. Pass ignore_mismatched_sizes=True to skip them."
            )
        warnings.warn(f"Skipped tensors of mismatched size: {lines}", PeftWarning, stacklevel=2)
    with torch.no_grad():
        for mem_key, value in assignments:
            _assign(model, mem_key, value, low_cpu_mem_usage)
    loaded = {m for m, _ in assignments}
    missing = [k for k in wanted.values() if k not in loaded]
    if low_cpu_mem_usage and config.is_prompt_learning:
        model.prompt_learning.move_to_device(adapter_name)
    elif low_cpu_mem_usage:
        for _, module in inner.named_modules():
            if isinstance(module, AdapterLayer) and module.has_adapter(adapter_name):
                module._move_adapter_to_device_of_base_layer(adapter_name)
    return _LoadResult(missing, unexpected)


def _exists(model: nn.Module, key: str) -> bool:
    try:
        _lookup(model, key)
        return True
    except (KeyError, AttributeError):
        return False


class _LoadResult(tuple):
    def __new__(cls, missing, unexpected):
        obj = super().__new__(cls, (missing, unexpected))
        obj.missing_keys, obj.unexpected_keys = missing, unexpected
        return obj


def _assign(model: nn.Module, key: str, value: torch.Tensor, assign: bool) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path)
    current = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
    if current is None and isinstance(module, nn.ParameterDict):
        current = module[name]
    value = distributed.load_into(key, current, value)
    if assign or current.device.type == "meta":
        new = value.to(dtype=current.dtype if current.is_floating_point() else value.dtype)
        if isinstance(current, nn.Parameter):
            module._parameters[name] = nn.Parameter(new, requires_grad=current.requires_grad)
        else:
            module._buffers[name] = new
    else:
        current.copy_(value.to(device=current.device, dtype=current.dtype))


# -- the base model's own state dict ----------------------------------------------------


def _base_key_map(module: nn.Module, peft_prefix: str = "", prefix: str = "") -> dict[str, str]:
    """``{key in the adapted model's state dict: key the base model had}`` for every tensor of
    the base model: adapter tensors are left out, the ``base_layer`` / ``original_module``
    segments of adapter layers and ``modules_to_save`` wrappers are taken out of the keys."""
    if isinstance(module, AdapterLayer):
        return _base_key_map(module.base_layer, f"{peft_prefix}base_layer.", prefix)
    if isinstance(module, ModulesToSaveWrapper):
        return _base_key_map(module.original_module, f"{peft_prefix}original_module.", prefix)
    mapping = {f"{peft_prefix}{name}": f"{prefix}{name}" for name, t in module._parameters.items() if t is not None}
    mapping.update({f"{peft_prefix}{name}": f"{prefix}{name}" for name, t in module._buffers.items()
                    if t is not None and name not in module._non_persistent_buffers_set})
    for name, child in module._modules.items():
        if child is not None:
            mapping.update(_base_key_map(child, f"{peft_prefix}{name}.", f"{prefix}{name}."))
    return mapping


def _base_model(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_base_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's state dict under the keys it had before adapters were added (no
    adapter tensors, no ``base_layer`` / ``original_module`` segments): e.g. to save or
    shard the base weights of an adapted model."""
    base = _base_model(model)
    state = base.state_dict()
    return {original: state[key] for key, original in _base_key_map(base).items() if key in state}


def set_base_model_state_dict(model, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load a state dict with the base model's own keys into an adapted model (the inverse of
    :func:`get_base_model_state_dict`); adapters are left alone. Returns ``(missing_keys,
    unexpected_keys)``; with ``strict`` either raises ``RuntimeError`` and nothing is loaded."""
    base = _base_model(model)
    keys = {original: key for key, original in _base_key_map(base).items()}
    unexpected = [k for k in state_dict if k not in keys]
    missing = [k for k in keys if k not in state_dict]
    if strict and (missing or unexpected):
        raise StateDictMismatchError(f"Error(s) in loading the base model's state_dict: missing keys {missing}, "
                                     f"unexpected keys {unexpected}. Pass strict=False to load the matching ones.")
    base.load_state_dict({keys[k]: v for k, v in state_dict.items() if k in keys}, strict=False)
    return _LoadResult(missing, unexpected)


# -- files ------------------------------------------------------------------------------


def load_peft_weights(model_id: str, device: str | None = None, key_mapping: dict | None = None,
                      use_pickle: bool = True, **hub_kwargs) -> dict[str, torch.Tensor]:
    """Read an adapter's tensors from a local directory or a Hub repo id (``hub_kwargs``:
    ``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ...).

    ``adapter_model.safetensors`` is preferred; ``adapter_model.bin`` is read only when no
    safetensors file exists, and then with ``torch.load(weights_only=True)``. The files read
    are those of the directory's last complete save (see :mod:`peft_kernel.io`).
    """
    from .hub import resolve_file, split_hub_kwargs

    device = device or "cpu"
    hub, _ = split_hub_kwargs(hub_kwargs)
    with io.locked(os.path.join(model_id, hub.get("subfolder") or "")):  # the files of one save
        try:
            file = resolve_file(model_id, (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME), **hub)
        except FileNotFoundError as exc:
            raise ValueError(f"Can't load the adapter weights of {model_id!r}: {exc}") from None
        if file.endswith(".safetensors"):
            state = _read_safetensors(file, device)
        else:
            try:
                state = torch.load(file, map_location=device, weights_only=True)
            except Exception as exc:
                raise ValueError(f"{file} could not be loaded safely (weights_only=True): {exc}") from None
            if not isinstance(state, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
                raise ValueError(f"{file} does not hold a dict of named tensors; it is not an adapter checkpoint")
    if key_mapping:
        import re

        remapped = {}
        for key, value in state.items():
            short = key[len(MODEL_PREFIX):] if key.startswith(MODEL_PREFIX) else key
            for pattern, replacement in key_mapping.items():
                short, n = re.subn(pattern, replacement, short)
                if n:
                    break
            remapped[MODEL_PREFIX + short if key.startswith(MODEL_PREFIX) else short] = value
        state = remapped
    return state


def _read_safetensors(path: str, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors file ({exc}). It may be truncated or corrupt; save the adapter "
            "again."
        ) from None


def weights_file_names(safe_serialization: bool) -> tuple[str, str]:
    """``(the weights file a save writes, the other format's file, which it removes)``."""
    return (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if safe_serialization else (WEIGHTS_NAME, SAFETENSORS_WEIGHTS_NAME)


def save_weights(state_dict: dict[str, torch.Tensor], directory: str, safe_serialization: bool = True) -> str:
    """Write adapter tensors into ``directory`` as one crash-consistent save; returns the file path.

    A weights file of the other format is removed with it (it would shadow the new one)."""
    name, other = weights_file_names(safe_serialization)
    with io.staged(directory, remove=[other]) as stage:
        write_weights(state_dict, os.path.join(stage, name), safe_serialization)
    return os.path.join(directory, name)


def write_weights(state_dict: dict[str, torch.Tensor], path: str, safe_serialization: bool = True) -> None:
    """Write adapter tensors to the file ``path`` (safetensors, or a weights-only torch pickle)."""
    if safe_serialization:
        from safetensors.torch import save_file

        seen: dict[int, str] = {}
        clean = {}
        for key, tensor in state_dict.items():
            tensor = tensor.detach()
            ptr = tensor.data_ptr() if tensor.numel() else None
            if ptr is not None and ptr in seen:
                tensor = tensor.clone()  # safetensors refuses shared storage
            elif ptr is not None:
                seen[ptr] = key
            clean[key] = tensor.contiguous().cpu()
        save_file(clean, path, metadata={"format": "pt"})
    else:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path)
