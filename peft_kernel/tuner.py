"""The model-level side of every layer-wrapping method: injection, activation, merging,
unloading, trainability. A method's tuner class is a near-empty subclass of
:class:`BaseTuner` that names its ``prefix`` and layer base class."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import targeting
from .auxiliary import ModulesToSaveWrapper
from .config import PeftConfig
from .errors import PeftWarning
from .layer import AdapterLayer
from .plugins import manager


def iter_modules_with_parent(model: nn.Module) -> Iterator[tuple[str, nn.Module, Optional[nn.Module], str]]:
    """``(qualified name, module, parent, attribute name)`` for every module, parents first."""
    stack: list[tuple[str, nn.Module, Optional[nn.Module], str]] = [("", model, None, "")]
    while stack:
        name, module, parent, attr = stack.pop()
        yield name, module, parent, attr
        children = list(module._modules.items())
        for child_attr, child in reversed(children):
            if child is not None:
                stack.append((f"{name}.{child_attr}" if name else child_attr, child, module, child_attr))


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Adapter layers and ``modules_to_save`` wrappers (outermost ones) with their names."""
    for name, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            yield name, module


class BaseTuner(nn.Module):
    """Wraps a model and injects adapters of one method into it.

    Subclasses set :attr:`prefix` (the parameter-name prefix of the method, e.g.
    ``"lora_"``) and :attr:`layer_cls` (the method's :class:`AdapterLayer` base) and may
    override the ``_prepare_*`` / ``_check_*`` hooks below.
    """

    prefix: str = ""
    layer_cls: type = AdapterLayer
    #: ``{model_type: [module names]}`` used when ``target_modules`` is None
    default_target_modules: dict[str, list[str]] = {}
    #: compress long target lists into equivalent short suffix sets
    compress_targets: bool = True
    #: names of tuner-level per-adapter containers saved with the adapter (shared buffers)
    shared_buffer_names: tuple[str, ...] = ()
    #: human-readable layer types the method supports, for error messages
    supported_layer_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None,
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        if not hasattr(self, "peft_config"):
            self.peft_config: dict[str, PeftConfig] = (
                dict(peft_config) if isinstance(peft_config, dict) else {adapter_name: peft_config}
            )
        else:
            self.peft_config[adapter_name] = peft_config
        self.active_adapter: str | list[str] = adapter_name
        self._pre_injection_hook(model, self.peft_config[adapter_name], adapter_name)
        self.inject_adapter(self.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                            state_dict=state_dict, autocast_adapter_dtype=autocast_adapter_dtype)
        self.model.peft_config = self.peft_config

    # -- forwarding -------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.forward(*args, **kwargs)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    # -- hooks for subclasses ---------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        pass

    def _prepare_adapter_config(self, config, model_config: dict) -> Any:
        """Fill ``target_modules`` from :attr:`default_target_modules` when unset."""
        if getattr(config, "target_modules", "") is None and not getattr(config, "target_parameters", None):
            model_type = model_config.get("model_type")
            if model_type not in self.default_target_modules:
                raise ValueError(
                    f"Please specify `target_modules` in the config: there are no default targets for model type "
                    f"{model_type!r} in {type(self).__name__}."
                )
            config = copy.copy(config)
            config.target_modules = set(self.default_target_modules[model_type])
        return config

    def _check_new_adapter_config(self, config) -> None:
        """Raise if ``config`` cannot be added next to the existing adapters."""

    def _prepare_model(self, config, model: nn.Module) -> None:
        """Last chance to change the model before layers are replaced."""

    def _after_layer_created(self, layer: AdapterLayer, adapter_name: str, config) -> None:
        pass

    # -- injection --------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        config = self.peft_config[adapter_name]
        self._check_new_adapter_config(config)
        config = self._prepare_adapter_config(config, _model_config(model))
        self.peft_config[adapter_name] = config
        self._prepare_model(config, model)

        entries = list(iter_modules_with_parent(model))
        names = [name for name, *_ in entries if name]
        is_layer = lambda m: isinstance(m, AdapterLayer)  # noqa: E731

        targets = config.target_modules
        if state_dict is not None:
            wanted = _targets_from_state_dict(state_dict, self.prefix)
            if isinstance(targets, (set, list)) and set(targets) != wanted or isinstance(targets, str):
                warnings.warn("The state_dict keys decide the targets; they differ from the config's target_modules.",
                              PeftWarning, stacklevel=2)
            config.target_modules = targets = wanted
        elif targets == targeting.ALL_LINEAR:
            config.target_modules = targets = targeting.expand_all_linear(model, config, is_layer)
        elif isinstance(targets, set) and self.compress_targets and len(targets) >= targeting.MIN_TARGETS_FOR_COMPRESSION:
            config.target_modules = targets = targeting.compress_targets(targets, names)

        if isinstance(targets, str) and targets == targeting.DUMMY_TARGET:
            matched_any = True
        else:
            matched_any = False
        excluded_any = False
        adapter_prefixes: list[str] = []
        modules_to_save = set(getattr(config, "modules_to_save", None) or ())
        wrapped_saves: set[str] = set()
        for key, module, parent, attr in entries:
            if not key:
                continue
            if any(key.startswith(p) for p in adapter_prefixes):
                continue  # internals of adapter layers are never candidates
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                adapter_prefixes.append(key + ".")
            if modules_to_save and _suffix_in(key, modules_to_save):
                self._wrap_module_to_save(parent, attr, module, adapter_name)
                wrapped_saves.add(key)
                continue
            if targeting.is_excluded(config, key):
                excluded_any = excluded_any or targeting.matches_target(config, key)
                continue
            if targeting.in_modules_to_save(config, key) or not targeting.matches_target(config, key):
                continue
            matched_any = True
            self._create_and_replace(config, adapter_name, module, key, parent, attr, low_cpu_mem_usage,
                                     autocast_adapter_dtype)
            self.targeted_module_names.append(key)

        if modules_to_save and not wrapped_saves:
            missing = sorted(modules_to_save)
            raise ValueError(f"modules_to_save {missing} matched no module of the model; check the names")
        if not matched_any:
            hint = " (all matches were excluded by exclude_modules)" if excluded_any else ""
            raise ValueError(
                f"Target modules {_describe_targets(config.target_modules)} not found in the base model{hint}. "
                "Check target_modules against model.named_modules()."
            )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for name, param in model.named_parameters():
                if adapter_name in name.split("."):
                    param.requires_grad_(False)

    def _wrap_module_to_save(self, parent, attr, module, adapter_name) -> None:
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))

    def _create_and_replace(self, config, adapter_name, target, key, parent, attr, low_cpu_mem_usage=False,
                            autocast_adapter_dtype=True) -> None:
        kwargs = config.layer_kwargs(key)
        if isinstance(target, self.layer_cls) and type(target).update_layer is not AdapterLayer.update_layer:
            with _maybe_meta(low_cpu_mem_usage):
                target.update_layer(adapter_name, config=config, **kwargs)
            layer = target
        else:
            if isinstance(target, AdapterLayer):
                raise ValueError(
                    f"Module {key!r} is already adapted by another method ({type(target).__name__}); "
                    "unload() it first or exclude it"
                )
            with _maybe_meta(low_cpu_mem_usage):
                layer = manager().dispatch_layer(target, key, adapter_name, config)
            if layer is None:
                raise ValueError(self._unsupported_message(target, key, config))
            setattr(parent, attr, layer)
        if adapter_name not in layer.active_adapters and layer.active_adapters == []:
            layer._active_adapter = [adapter_name]
        layer._adapter_state_changed()
        if not low_cpu_mem_usage:
            layer._move_adapter_to_device_of_base_layer(adapter_name)
        layer._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        self._after_layer_created(layer, adapter_name, config)

    def _unsupported_message(self, target, key, config) -> str:
        cls = type(target)
        from .dispatch import user_mappings

        supported = list(self.supported_layer_types)
        supported += [t.__name__ for t in user_mappings(config)]
        backends = [b.name for b in manager().quant_backends()]
        if backends:
            supported.append("quantized linear layers of: " + ", ".join(backends))
        return (
            f"Target module {key!r} of type {cls.__module__}.{cls.__qualname__} is not supported by "
            f"{config.peft_type}. Supported by the installed plugins: {', '.join(supported) or 'nothing'}. "
            "Adapt it with a custom layer: peft_kernel.register_layer_mapping(<module type>, <layer class>, "
            f"method={config.peft_type!r}), or leave it out of target_modules."
        )

    # -- trainability -----------------------------------------------------------------

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if self.prefix not in name and ".modules_to_save." not in name:
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            if config is None or config.inference_mode:
                continue
            bias = getattr(config, "bias", "none")
            if bias == "all":
                for name, param in model.named_parameters():
                    if name.endswith("bias") and ".modules_to_save." not in name:
                        param.requires_grad_(True)
            elif isinstance(bias, str) and bias.endswith("_only"):
                for _, module in adapter_modules(model):
                    base = getattr(module, "get_base_layer", None)
                    base_bias = getattr(base(), "bias", None) if base else None
                    if isinstance(base_bias, nn.Parameter):
                        base_bias.requires_grad_(True)
            elif bias != "none" and bias is not None:
                raise ValueError(f"bias must be 'none', 'all' or '<method>_only', got {bias!r}")

    # -- activation -------------------------------------------------------------------

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {sorted(self.peft_config)}")
        for _, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer) and module.merged:
                warnings.warn("Adapters are merged; unmerge them before switching adapters.", PeftWarning, stacklevel=2)
                module.unmerge()
            module.set_adapter(names, inference_mode=inference_mode)
        self.active_adapter = names[0] if len(names) == 1 else names

    def _set_adapter_layers(self, enabled: bool) -> None:
        for _, module in adapter_modules(self.model):
            module.enable_adapters(enabled)

    def enable_adapter_layers(self) -> None:
        self._set_adapter_layers(True)

    def disable_adapter_layers(self) -> None:
        for _, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer) and module.merged:
                warnings.warn("Adapters are merged; unmerging them to disable.", PeftWarning, stacklevel=2)
        self._set_adapter_layers(False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}")
        del self.peft_config[adapter_name]
        for _, module in adapter_modules(self.model):
            module.delete_adapter(adapter_name)
        for name in self.shared_buffer_names:
            container = getattr(self, name, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining:
            remaining = sorted(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining, inference_mode=self.peft_config[remaining[0]].inference_mode)
        else:
            self.active_adapter = []
        self.targeted_module_names = [
            n for n, m in adapter_modules(self.model) if isinstance(m, AdapterLayer) and m._all_available_adapter_names()
        ]

    # -- merging ----------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        """Raise before any change when the model cannot merge."""
        for name, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer) and module.has_adapter_any(self.active_adapters):
                reason = module.merge_blocker()
                if reason:
                    raise ValueError(f"Cannot merge layer {name!r}: {reason}")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()
        for _, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer):
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        merged_any = False
        for _, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer) and module.merged:
                module.unmerge()
                merged_any = True
        if not merged_any:
            warnings.warn("No adapter is merged; nothing to unmerge.", PeftWarning, stacklevel=2)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Fold the adapters into the base weights and return the plain model."""
        self._check_merge_allowed()
        return self._unload(merge=True, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain model."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: Optional[list[str]] = None) -> nn.Module:
        replacements = []
        owners: list[str] = []
        for key, module, parent, attr in iter_modules_with_parent(self.model):
            if parent is None or any(key.startswith(o) for o in owners):
                continue  # nested adapter layers are unloaded with their owner
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                owners.append(key + ".")
                replacements.append((key, module, parent, attr))
        iterator = replacements
        if progressbar:
            from tqdm import tqdm

            iterator = tqdm(replacements, desc="Unloading" + (" and merging" if merge else ""))
        for key, module, parent, attr in iterator:
            if isinstance(module, ModulesToSaveWrapper):
                new = module._active_copy() if not module.disable_adapters else module.original_module
                if merge and isinstance(new, AdapterLayer):
                    new.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                new = new.get_base_layer() if isinstance(new, AdapterLayer) else new
            else:
                if merge:
                    module.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                new = module.get_base_layer()
                _unload_nested(new, merge, safe_merge, adapter_names)
            setattr(parent, attr, new)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

def _unload_nested(module: nn.Module, merge: bool, safe_merge: bool, adapter_names) -> None:
    """Adapter layers nested inside a base layer (e.g. an attention block's out_proj)."""
    for key, child, parent, attr in list(iter_modules_with_parent(module)):
        if parent is not None and isinstance(child, AdapterLayer):
            if merge:
                child.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            setattr(parent, attr, child.get_base_layer())


def _suffix_in(key: str, names: set[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def _describe_targets(targets) -> str:
    if isinstance(targets, (set, list)):
        return str(sorted(targets))
    return repr(targets)


def _model_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {"model_type": "custom"}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    return dict(getattr(config, "__dict__", {}))


def _targets_from_state_dict(state_dict: dict, prefix: str) -> set[str]:
    targets = set()
    for key in state_dict:
        if prefix not in key:
            continue
        module = key.split("." + prefix)[0] if "." + prefix in key else key.split(prefix)[0].rstrip(".")
        if module.startswith("base_model.model."):
            module = module[len("base_model.model."):]
        targets.add(module)
    return targets


@contextmanager
def _maybe_meta(enabled: bool):
    if enabled:
        with torch.device("meta"):
            yield
    else:
        yield
