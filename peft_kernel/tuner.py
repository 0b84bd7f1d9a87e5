"""The model-level side of every layer-wrapping method: injection, activation, merging,
unloading, trainability. A method's tuner class is a near-empty subclass of
:class:`BaseTuner` that names its ``prefix`` and layer base class."""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import distributed, targeting
from .auxiliary import ModulesToSaveWrapper
from .config import PeftConfig
from .dispatch import dispatch_method_layer, user_mappings
from .errors import MergeNotSupportedError, NoMatchingPeftModuleError, PeftWarning, UnsupportedFeatureError
from .layer import BASE_ADAPTER, AdapterLayer, ParameterLayer
from .plugins import manager
from .tying import plan as tying_plan


def check_adapter_name(adapter_name: object) -> None:
    """Refuse a name that cannot be both a state-dict key segment and one path component.

    Adapters other than ``default`` are saved in ``<save_directory>/<name>/``, so a name is a
    directory name: it must not climb out (``..``), be absolute or hold a separator.
    """
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter name must be a non-empty string, got {adapter_name!r}")
    bad = sorted({c for c in adapter_name if c in "./\\:" or ord(c) < 32})
    if bad:
        raise ValueError(
            f"adapter name {adapter_name!r} contains {''.join(bad)!r}: a name becomes a key segment and, on save, a "
            "directory name, so it must not contain '.', path separators, ':' or control characters. "
            "Use letters, digits, '-' and '_'."
        )
    if adapter_name == BASE_ADAPTER:
        raise ValueError(f"adapter name {BASE_ADAPTER!r} is reserved: in adapter_names it means 'no adapter'")


def iter_modules_with_parent(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module | None, str]]:
    """``(qualified name, module, parent, attribute name)`` for every module, parents first."""
    stack: list[tuple[str, nn.Module, nn.Module | None, str]] = [("", model, None, "")]
    while stack:
        name, module, parent, attr = stack.pop()
        yield name, module, parent, attr
        children = list(module._modules.items())
        for child_attr, child in reversed(children):
            if child is not None:
                stack.append((f"{name}.{child_attr}" if name else child_attr, child, module, child_attr))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Injection creates a dozen small modules per target; with the cyclic collector running,
    its repeated scans of them make that 3-5× slower. Nothing built here is cyclic garbage."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Adapter layers and ``modules_to_save`` wrappers with their names, parents first (nested
    ones too). The per-adapter containers of adapter layers (``adapter_layer_names``,
    ``other_param_names``) are not walked: they hold factors and dropouts, no adapter layer, and
    with many adapters they are most of the model's modules (every mixed batch walks this)."""
    seen: set[int] = set()  # a module reachable twice is listed once, as named_modules() does
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        per_adapter: tuple[str, ...] = ()
        if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
            yield name, module
            if isinstance(module, AdapterLayer):
                per_adapter = module.adapter_layer_names + module.other_param_names
        for attr, child in reversed(module._modules.items()):
            if child is not None and attr not in per_adapter:
                stack.append((f"{name}.{attr}" if name else attr, child))


class BaseTuner(nn.Module):
    """Wraps a model and injects adapters of one method into it.

    Subclasses set :attr:`prefix` (the parameter-name prefix of the method, e.g.
    ``"<method>_"``) and :attr:`layer_cls` (the method's :class:`AdapterLayer` base) and may
    override the ``_prepare_*`` / ``_check_*`` hooks below.
    """

    prefix: str = ""
    layer_cls: type = AdapterLayer
    #: ``{model_type: [module names] or regex}`` used when ``target_modules`` is None
    default_target_modules: dict[str, list[str]] = {}
    #: compress long target lists into equivalent short suffix sets
    compress_targets: bool = True
    #: names of tuner-level per-adapter containers saved with the adapter (shared buffers)
    shared_buffer_names: tuple[str, ...] = ()
    #: extra keyword arguments of ``PeftModel.forward`` that the method's layers consume
    special_forward_args: tuple[str, ...] = ()
    #: human-readable layer types the method supports, for error messages
    supported_layer_types: tuple[str, ...] = ()
    #: the kernel's dispatch, opted into by setting it: where no plugin's ``peft_kernel_dispatch_layer``
    #: builds a layer for a target, the kernel builds :attr:`layer_cls` around it if it is linear-like
    #: (``nn.Linear``, transformers' ``Conv1D``, quantized linear layers) or of one of these types;
    #: ``None``: the method's own dispatch hook alone decides
    dispatch_types: tuple[type, ...] | None = None
    #: the :class:`~peft_kernel.layer.ParameterLayer` that adapts a bare ``nn.Parameter``
    #: (``target_parameters`` in the config); ``None``: the method cannot target parameters
    parameter_layer_cls: type | None = None
    #: set on the per-method tuners of a mixed model (:class:`~peft_kernel.mixed.MixedTuner`): a
    #: target already adapted by another method gets this method's layer around it (instead of an
    #: error), and activation and trainability across methods are left to the mixed tuner
    mixed_member: bool = False

    def __init__(self, model: nn.Module, peft_config, adapter_name: str | None = "default",
                 low_cpu_mem_usage: bool = False, state_dict: dict | None = None,
                 autocast_adapter_dtype: bool = True) -> None:
        if not (adapter_name is None and isinstance(peft_config, dict)):  # else a tuner built empty (mixed models)
            check_adapter_name(adapter_name)
        super().__init__()
        self.model = model
        self.targeted_module_names: list[str] = []
        self.targeted_parameter_names: list[str] = []
        if adapter_name is None:  # a tuner without adapters yet: a mixed model's per-method tuner
            self.peft_config, self.active_adapter = dict(peft_config), []
            return
        if not hasattr(self, "peft_config"):
            self.peft_config: dict[str, PeftConfig] = (
                dict(peft_config) if isinstance(peft_config, dict) else {adapter_name: peft_config}
            )
        else:
            self.peft_config[adapter_name] = peft_config
        self.active_adapter: str | list[str] = adapter_name
        with self._undo_on_failure(adapter_name):
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
            targets = self.default_target_modules[model_type]
            config.target_modules = targets if isinstance(targets, str) else set(targets)  # a str is a regex
        return config

    def _check_new_adapter_config(self, config) -> None:
        """Raise if ``config`` cannot be added next to the existing adapters."""

    def _prepare_model(self, config, model: nn.Module) -> None:
        """Last chance to change the model before layers are replaced."""

    def _select_targets(self, config, module_names: list[str]) -> set[str] | None:
        """The names of the modules ``config`` adapts, for a method that chooses them itself.

        ``module_names`` lists every module of the model in ``named_modules()`` order. Return
        ``None`` (the default) to apply the standard rules of :mod:`peft_kernel.targeting` to
        ``config.target_modules``, or a set of names that replaces that match (e.g. "the last
        *n* modules with this attribute name"); ``exclude_modules``, ``modules_to_save`` and
        the skipping of adapter internals still apply. Called once per injection, after
        :meth:`_prepare_adapter_config` and :meth:`_prepare_model`. Raise ``ValueError`` when
        the model cannot hold the adapter.
        """
        return None

    def _after_layer_created(self, layer: AdapterLayer, adapter_name: str, config) -> None:
        pass

    def per_call_state(self, args: tuple, kwargs: dict[str, Any], *, generating: bool) -> Callable[..., dict] | None:
        """Per-call values for the adapter layers (routing state that depends on the input).

        Called by ``PeftModel.forward`` / ``generate`` with the call's arguments (special
        forward arguments still included). Return ``None`` when this call needs
        nothing, or a function ``step(args, kwargs) -> dict``: the kernel calls it before
        every forward of the base model during the call (once for ``forward``, once per
        step for ``generate``) with that forward's arguments, and every adapter layer reads
        the returned values from :attr:`AdapterLayer.call_state` until the next step. The
        values are dropped when the call returns.
        """
        return None

    # -- injection --------------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> None:
        check_adapter_name(adapter_name)
        with _gc_paused():
            self._inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)

    def _inject_adapter(self, model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict) -> None:
        config = self.peft_config[adapter_name]
        biased = [name for name, c in self.peft_config.items() if getattr(c, "bias", "none") not in ("none", None)]
        if len(biased) > 1:  # each would train (and save) the same base biases
            raise ValueError(f"Only one adapter can train biases; {biased} set `bias`. Set bias='none' for all "
                             "adapters but one.")
        self._check_new_adapter_config(config)
        config = self._prepare_adapter_config(config, _model_config(model))
        self.peft_config[adapter_name] = config
        if getattr(config, "target_parameters", None):
            self._check_parameter_config(config, adapter_name, state_dict)
        self._prepare_model(config, model)
        # parameters are wrapped after the modules, but checked before anything changes
        parameter_keys = self._parameter_targets(config, model) if getattr(config, "target_parameters", None) else []

        entries = list(iter_modules_with_parent(model))
        names = [name for name, *_ in entries if name]
        is_layer = lambda m: isinstance(m, AdapterLayer)  # noqa: E731

        targets = config_targets = config.target_modules
        if state_dict is not None:
            wanted = _targets_from_state_dict(state_dict, self.prefix)
            if isinstance(targets, (set, list)) and set(targets) != wanted or isinstance(targets, str):
                warnings.warn("The state_dict keys decide the targets; they differ from the config's target_modules.",
                              PeftWarning, stacklevel=2)
            config.target_modules = targets = wanted
        elif targets == targeting.ALL_LINEAR:
            config.target_modules = targets = targeting.expand_all_linear(model, config, is_layer)
        if (state_dict is None and isinstance(targets, set) and self.compress_targets
                and len(targets) >= targeting.MIN_TARGETS_FOR_COMPRESSION):
            config.target_modules = targets = targeting.compress_targets(targets, names)
        if targets is not config_targets:
            _check_resolved(config, config_targets)

        selected = self._select_targets(config, names)
        is_match = functools.partial(targeting.matches_target, config) if selected is None else selected.__contains__
        tying = tying_plan(config, model, is_match)
        if tying is not None and not tying.via_modules_to_save and type(self)._tie_layer is BaseTuner._tie_layer:
            raise UnsupportedFeatureError(self._no_tying_message(tying))

        if isinstance(targets, str) and targets == targeting.DUMMY_TARGET:
            matched_any = True
        else:
            matched_any = False
        excluded_any = False
        inside: str | None = None  # pre-order walk: an adapter layer's internals follow it directly
        modules_to_save = set(getattr(config, "modules_to_save", None) or ())
        wrapped_saves: set[str] = set()
        for key, module, parent, attr in entries:
            if not key:
                continue
            if inside is not None and key.startswith(inside):
                continue  # internals of adapter layers are never candidates
            inside = None
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                inside = key + "."
            if tying is not None and tying.skips(key):
                continue  # tied to the input embeddings once they are adapted, below
            if modules_to_save and _suffix_in(key, modules_to_save):
                self._wrap_module_to_save(parent, attr, module, adapter_name)
                wrapped_saves.add(key)
                continue
            if targeting.is_excluded(config, key):
                excluded_any = excluded_any or is_match(key)
                continue
            if targeting.in_modules_to_save(config, key) or not is_match(key):
                continue
            matched_any = True
            self._create_and_replace(config, adapter_name, module, key, parent, attr, low_cpu_mem_usage,
                                     autocast_adapter_dtype)
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)

        if modules_to_save and not wrapped_saves:
            missing = sorted(modules_to_save)
            raise ValueError(f"modules_to_save {missing} matched no module of the model; check the names")
        if tying is not None:
            self._tie_to_input_embeddings(tying, model, config, adapter_name, low_cpu_mem_usage,
                                          autocast_adapter_dtype)
        if parameter_keys:
            self._inject_parameters(config, adapter_name, model, set(parameter_keys), low_cpu_mem_usage,
                                    autocast_adapter_dtype)
            matched_any = True
        if not matched_any:
            hint = " (all matches were excluded by exclude_modules)" if excluded_any else ""
            raise NoMatchingPeftModuleError(
                f"Target modules {_describe_targets(config.target_modules)} not found in the base model{hint}. "
                "Check target_modules against model.named_modules()."
            )
        _warn_unmatched_patterns(config, self.targeted_module_names)
        if not self.mixed_member:
            self._activate_injected(model, adapter_name, config)

    def _activate_injected(self, model: nn.Module, adapter_name: str, config) -> None:
        """After an injection: the active adapters stay active; only adapters (and
        ``modules_to_save`` copies) are trainable, and none of an inference-mode adapter."""
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for name, param in model.named_parameters():
                if adapter_name in name.split("."):
                    param.requires_grad_(False)

    def _tie_to_input_embeddings(self, tying, model, config, adapter_name, low_cpu_mem_usage,
                                 autocast_adapter_dtype) -> None:
        """Give the modules tied to the input embeddings the embeddings' adapter tensors."""
        source = model.get_submodule(tying.source)
        for key in tying.tied:
            parent_name, _, attr = key.rpartition(".")
            parent = model.get_submodule(parent_name)
            module = getattr(parent, attr)
            if tying.via_modules_to_save:
                weight = source.modules_to_save[adapter_name].weight
                if isinstance(module, ModulesToSaveWrapper):
                    module.update(adapter_name, tied_weight=weight)
                else:
                    setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name, tied_weight=weight))
                continue
            if not (isinstance(source, AdapterLayer) and source.has_adapter(adapter_name)):
                raise ValueError(f"ensure_weight_tying: the input embeddings {tying.source!r} got no adapter, so "
                                 f"{key!r} has nothing to be tied to; check exclude_modules and layers_to_transform")
            self._create_and_replace(config, adapter_name, module, key, parent, attr, low_cpu_mem_usage,
                                     autocast_adapter_dtype)
            self._tie_layer(getattr(parent, attr), source, adapter_name)
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)

    def save_relative_to_initial(self, peft_model, adapter_name: str, config, state_dict: dict,
                                 initial_path: str) -> tuple[dict, PeftConfig]:
        """The checkpoint of ``adapter_name`` rewritten to apply to the base weights as they were
        before its initialisation changed them (inits that move part of the base weight into the
        adapter), given the adapter as saved
        right after that initialisation in ``initial_path``: ``save_pretrained(...,
        path_initial_model_for_weight_conversion=initial_path)``. Returns the new tensors and
        config. The default refuses: only methods whose initialisation changes the base implement it."""
        raise ValueError(f"path_initial_model_for_weight_conversion is not supported for {config.peft_type}: its "
                         "initialisation does not change the base weights, so the adapter applies to them as saved.")

    def _tie_layer(self, layer: AdapterLayer, source: AdapterLayer, adapter_name: str) -> None:
        """Make ``layer``'s adapter ``adapter_name`` use the tensors of ``source``'s.

        Method hook for ``ensure_weight_tying=True`` with the input embeddings among the
        targets: ``source`` is the adapter layer of the input embeddings, ``layer`` the one just
        created for a module sharing their weight (e.g. the output head), so that both apply the
        same trained update. The default refuses (before the model changes)."""
        raise UnsupportedFeatureError(self._no_tying_message(None))

    def _no_tying_message(self, tying) -> str:
        peft_type = next((c.peft_type for c in self.peft_config.values()), type(self).__name__)
        where = f" ({tying.tied} share the weight of {tying.source!r})" if tying is not None else ""
        return (f"{peft_type} cannot tie the adapters of layers that share a weight{where}: its tuner has no "
                "_tie_layer. Use modules_to_save for the embeddings instead, or set ensure_weight_tying=False.")

    def _wrap_module_to_save(self, parent, attr, module, adapter_name) -> None:
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))

    def _create_and_replace(self, config, adapter_name, target, key, parent, attr, low_cpu_mem_usage=False,
                            autocast_adapter_dtype=True) -> None:
        kwargs = config.layer_kwargs(key)
        # a layer of this method (its own classes, or a custom layer registered for it) takes the new adapter
        ours = (self.layer_cls, *user_mappings(config).values())
        if isinstance(target, ours) and type(target).update_layer is not AdapterLayer.update_layer:
            with _maybe_meta(low_cpu_mem_usage):
                target.update_layer(adapter_name, config=config, **kwargs)
            layer = target
        else:
            if isinstance(target, AdapterLayer) and not self.mixed_member:
                raise ValueError(
                    f"Module {key!r} is already adapted by another method ({type(target).__name__}); "
                    "unload() it first, exclude it, or use a mixed model (get_peft_model(..., mixed=True))"
                )
            with _maybe_meta(low_cpu_mem_usage):
                layer = manager().dispatch_layer(target, key, adapter_name, config)
                if layer is None and self.dispatch_types is not None:
                    layer = dispatch_method_layer(target, key, adapter_name, config, self.layer_cls,
                                                  dict.fromkeys(self.dispatch_types, self.layer_cls))
            if layer is None:
                raise ValueError(self._unsupported_message(target, key, config))
            blocker = layer.nesting_blocker() if isinstance(target, AdapterLayer) else None
            if blocker:
                raise ValueError(f"Cannot add {config.peft_type} adapter {adapter_name!r} to {key!r} around its "
                                 f"{type(target).__name__}: {blocker}")
            setattr(parent, attr, layer)
        self._finish_layer(layer, adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype)

    def _finish_layer(self, layer, adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype) -> None:
        """What every new or updated layer gets: activation, device, dtype, the tuner's hook."""
        if adapter_name not in layer.active_adapters and layer.active_adapters == []:
            layer._active_adapter = [adapter_name]
        layer.adapter_state_changed()
        if not low_cpu_mem_usage:
            layer._move_adapter_to_device_of_base_layer(adapter_name)
        layer._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        self._after_layer_created(layer, adapter_name, config)

    def _check_parameter_config(self, config, adapter_name, state_dict) -> None:
        wanted = set(config.target_parameters)
        if self.parameter_layer_cls is None:
            raise UnsupportedFeatureError(f"{config.peft_type} cannot adapt bare parameters: its tuner has no "
                                          "parameter layer. Leave target_parameters unset and use target_modules.")
        if state_dict is not None:
            raise ValueError("Injecting from a state_dict cannot target parameters (target_parameters); inject "
                             "the adapter without state_dict and load the weights afterwards")
        for other_name, other in self.peft_config.items():
            others = set(getattr(other, "target_parameters", None) or ())
            if other_name != adapter_name and others and others != wanted:
                raise ValueError(
                    f"Adapters that target parameters must all target the same ones: {sorted(wanted)} for "
                    f"{adapter_name!r} but {sorted(others)} for {other_name!r}. Use one set, or another model."
                )

    def _parameter_targets(self, config, model) -> list[str]:
        """``<module>.<parameter>`` names matched by ``config.target_parameters`` (exactly or as
        a dotted suffix), checked: a match must belong to a submodule that no module layer adapts
        now or after this injection."""
        wanted = set(config.target_parameters)
        matched = []
        for name, holder, outermost, _, _ in _parameter_holders(model):
            for param_name, param in holder._parameters.items():
                key = f"{name}.{param_name}" if name else param_name
                if param is None or not (key in wanted or any(key.endswith("." + w) for w in wanted)):
                    continue
                if not name:
                    raise ValueError(f"Parameter {param_name!r} belongs to the model itself; only parameters of "
                                     "submodules can be targeted")
                adapted = isinstance(outermost, AdapterLayer) and not isinstance(outermost, ParameterLayer)
                if adapted or targeting.is_target(config, name):
                    raise ValueError(f"Parameter {key!r} belongs to {name!r}, which target_modules adapts as a "
                                     "module; target the module or its parameters, not both")
                matched.append(key)
        if not matched:
            raise NoMatchingPeftModuleError(
                f"target_parameters {sorted(wanted)} matched no parameter of the model. Check them against "
                "'<module name>.<parameter name>' of model.named_modules() and each module's own parameters."
            )
        return matched

    def _inject_parameters(self, config, adapter_name, model, keys, low_cpu_mem_usage, autocast_adapter_dtype) -> None:
        """Wrap each parameter of ``keys`` in :attr:`parameter_layer_cls`, around whatever is in
        its module's place; a parameter that is already adapted gets the adapter in its layer."""
        for name, holder, outermost, parent, attr in list(_parameter_holders(model)):
            for param_name in list(holder._parameters):
                key = f"{name}.{param_name}"
                if key not in keys:
                    continue
                existing = _parameter_layer_for(outermost, param_name)
                kwargs = config.layer_kwargs(key)
                with _maybe_meta(low_cpu_mem_usage):
                    if existing is not None:
                        existing.update_layer(adapter_name, config=config, **kwargs)
                        layer = existing
                    else:
                        layer = self.parameter_layer_cls(outermost, adapter_name, parameter_name=param_name,
                                                         config=config, **kwargs)
                        setattr(parent, attr, layer)
                        outermost = layer
                self._finish_layer(layer, adapter_name, config, low_cpu_mem_usage, autocast_adapter_dtype)
                if key not in self.targeted_parameter_names:
                    self.targeted_parameter_names.append(key)

    def _unsupported_message(self, target, key, config) -> str:
        cls = type(target)
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

    @property
    def adapter_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the adapters this tuner holds (its method's)."""
        return (self.prefix,)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        prefixes = self.adapter_prefixes
        for name, param in model.named_parameters():
            if not any(p in name for p in prefixes) and ".modules_to_save." not in name:
                param.requires_grad_(False)
        for adapter in self.active_adapters:
            config = self.peft_config.get(adapter)
            if config is None or config.inference_mode:
                continue
            bias = getattr(config, "bias", "none")
            if bias == "all":
                for name, param in model.named_parameters():
                    if name.endswith("bias") and ".modules_to_save." not in name and ".original_module." not in name:
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
        merged = [n for n, m in adapter_modules(self.model)
                  if isinstance(m, AdapterLayer) and adapter_name in m.merged_adapters]
        if merged:  # its delta would stay in the base weights with nothing left to unmerge it
            raise ValueError(f"Cannot delete adapter {adapter_name!r} while it is merged (in {merged[:3]}); "
                             "call unmerge_adapter() first")
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
            n
            for n, m in adapter_modules(self.model)
            if isinstance(m, AdapterLayer) and m._all_available_adapter_names()
        ]

    # -- merging ----------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        """Raise before any change when the model cannot merge."""
        sharded = distributed.merge_blocker(self.model)
        if sharded:
            raise MergeNotSupportedError(f"Cannot merge while the model is sharded: {sharded}")
        writers: dict[int, str] = {}
        outermost: dict[int, str] = {}  # nested layers (one chain per module) write into one weight
        for name, module in adapter_modules(self.model):
            if not isinstance(module, AdapterLayer):
                continue
            owner = outermost.get(id(module), name)
            if isinstance(module.base_layer, AdapterLayer):
                outermost[id(module.base_layer)] = owner
            if module.has_adapter_any(self.active_adapters):
                reason = module.merge_blocker()
                if reason:
                    raise MergeNotSupportedError(f"Cannot merge layer {name!r}: {reason}")
                for param in module.merge_parameters():
                    other = writers.setdefault(id(param), owner)
                    if other != owner:
                        raise MergeNotSupportedError(
                            f"Cannot merge: layers {other!r} and {owner!r} share their base weight (e.g. replicated "
                            "or tied layers), so merging would add each one's adapter to both. Keep the adapters "
                            "unmerged, or unload() them."
                        )

    def _check_safe_merge(self, adapter_names: list[str] | None) -> None:
        """Every layer's merged weight is finite (checked on copies, one layer at a time), so a
        refused safe merge changes no layer."""
        for _, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer):
                names = module.active_adapters if adapter_names is None else adapter_names
                module.check_safe_merge([names] if isinstance(names, str) else list(names))

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights. With ``safe_merge``
        every layer is checked for NaN/inf results first, and a refused merge changes nothing."""
        self._check_merge_allowed()
        if safe_merge:
            self._check_safe_merge(adapter_names)
        # innermost first: a layer's forward acts on what the layers inside it produce, so its
        # adapters fold into the weight after theirs (order matters for weight transforms)
        for _, module in reversed(list(adapter_modules(self.model))):
            if isinstance(module, AdapterLayer):
                module.merge(adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        merged_any = False
        for _, module in adapter_modules(self.model):
            if isinstance(module, AdapterLayer) and module.merged:
                module.unmerge()
                merged_any = True
        if not merged_any:
            warnings.warn("No adapter is merged; nothing to unmerge.", PeftWarning, stacklevel=2)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the adapters into the base weights and return the plain model."""
        self._check_merge_allowed()
        if safe_merge:
            self._check_safe_merge(adapter_names)
        # checked above, for every layer before any changed
        return self._unload(merge=True, progressbar=progressbar, safe_merge=False, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain model."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, progressbar: bool = False, safe_merge: bool = False,
                adapter_names: list[str] | None = None) -> nn.Module:
        replacements = []
        inside: str | None = None
        for key, module, parent, attr in iter_modules_with_parent(self.model):
            if parent is None or (inside is not None and key.startswith(inside)):
                continue  # nested adapter layers are unloaded with their owner (pre-order walk)
            inside = None
            if isinstance(module, (AdapterLayer, ModulesToSaveWrapper)):
                inside = key + "."
                replacements.append((key, module, parent, attr))
        iterator = replacements
        if progressbar:
            from tqdm import tqdm

            iterator = tqdm(replacements, desc="Unloading" + (" and merging" if merge else ""))
        for _, module, parent, attr in iterator:
            if isinstance(module, ModulesToSaveWrapper):
                new = module._active_copy() if not module.disable_adapters else module.original_module
                if merge and isinstance(new, AdapterLayer):
                    new.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                new = new.get_base_layer() if isinstance(new, AdapterLayer) else new
            else:
                chain = [module]  # nested layers: one per parameter, or one per method in a mixed model
                while isinstance(chain[-1].base_layer, AdapterLayer):
                    chain.append(chain[-1].base_layer)
                if merge:
                    for layer in reversed(chain):  # innermost first, as merge_adapter does
                        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                new = chain[-1].base_layer
                _unload_nested(new, merge, safe_merge, adapter_names)
            setattr(parent, attr, new)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # -- combining adapters -----------------------------------------------------------

    #: combination types the method implements itself, in addition to the strategies
    #: registered through ``peft_kernel_register_combinations`` (structural ones such as
    #: concatenating factors, which are not a function of same-shaped tensors)
    combination_types: tuple[str, ...] = ()

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Add ``adapter_name``, a weighted combination of the existing ``adapters``.

        The new adapter is frozen and **not** activated (``set_adapter(adapter_name)``
        to use it). ``combination_type`` names a strategy registered through the
        ``peft_kernel_register_combinations`` hook or one the method implements itself
        (:attr:`combination_types`); with a single source it is always ``"linear"``.
        Everything that does not depend on the method happens here: validation, the
        target and ``modules_to_save`` bookkeeping, injection, trainability and rollback
        on failure. The method contributes two hooks: :meth:`_combined_config` (validate
        the sources and build the new config) and :meth:`_combine_layer` (fill one
        layer's new adapter from its sources).

        :param weights: one number per source; negative weights subtract.
        :param svd_rank, svd_clamp, svd_full_matrices, svd_driver: for strategies that
            re-factorise a combined delta (``svd=True``).
        :param density, majority_sign_method: passed to the strategy.
        :raises ValueError: for an existing ``adapter_name``, unknown sources, a weight
            count that differs from the source count, an unknown ``combination_type``
            (the message lists the known ones), sources whose ``target_modules`` are of
            different kinds (names vs. regex), or more than one source holding a
            ``modules_to_save`` copy of the same module.
        :raises TypeError: when the method does not support combining adapters.
        """
        if isinstance(adapters, str) or not isinstance(adapter_name, str):
            raise ValueError("adapters must be a list of adapter names and adapter_name a string")
        adapters = list(adapters)
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(
                f"Adapter {adapter_name!r} already exists; delete_adapter() it first or choose another name"
            )
        if not adapters:
            raise ValueError("add_weighted_adapter needs at least one source adapter")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} do not exist; available: {sorted(self.peft_config)}")
        weights = _check_weights(weights, len(adapters))
        configs = [self.peft_config[a] for a in adapters]
        with_params = [a for a, c in zip(adapters, configs, strict=True) if getattr(c, "target_parameters", None)]
        if with_params:
            raise ValueError(f"add_weighted_adapter does not support adapters that target parameters: {with_params}")
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")

        registry = manager().combinations()
        known = sorted(set(registry) | set(self.combination_types))
        if combination_type not in known:
            raise ValueError(
                f"Unknown combination_type {combination_type!r}; known for {configs[0].peft_type}: {', '.join(known)}. "
                "Strategies are added by plugins implementing peft_kernel_register_combinations."
            )
        if len(adapters) == 1:
            combination_type = "linear"
        combination = None if combination_type in self.combination_types else registry[combination_type]

        wrappers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        for name, wrapper in wrappers:
            owners = sorted({a for a in adapters if a in wrapper.modules_to_save})
            if len(owners) > 1:
                raise ValueError(
                    f"Cannot combine adapters {owners}: each holds its own modules_to_save copy of {name!r}, and "
                    "copies cannot be combined. Keep at most one of them among the sources."
                )
        target_modules = combine_target_modules([c.target_modules for c in configs], "target_modules")

        config = self._combined_config(adapters, combination_type, combination, svd_rank)
        config.target_modules = target_modules
        saves = [m for c in configs for m in (getattr(c, "modules_to_save", None) or ())]
        if hasattr(config, "modules_to_save"):
            config.modules_to_save = list(dict.fromkeys(saves)) or None
        custom = {}
        for c in configs:
            custom.update(getattr(c, "_custom_modules", None) or {})
        if hasattr(config, "_custom_modules"):
            config._custom_modules = custom or None

        grads = {p: p.requires_grad for p in self.model.parameters()}
        with self._undo_on_failure(adapter_name):
            self.peft_config[adapter_name] = config
            self.inject_adapter(self.model, adapter_name)
            for _, wrapper in adapter_modules(self.model):
                if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
                    owners = [a for a in adapters if a in wrapper.modules_to_save]
                    if owners:  # the one source that trained this module provides the copy
                        wrapper.modules_to_save[adapter_name].load_state_dict(
                            wrapper.modules_to_save[owners[0]].state_dict())
            options = dict(svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, svd_driver=svd_driver,
                           density=density, majority_sign_method=majority_sign_method)
            missed = []
            with torch.no_grad():
                for name, module in self.model.named_modules():
                    if not isinstance(module, AdapterLayer):
                        continue
                    present = [i for i, a in enumerate(adapters) if module.has_adapter(a)]
                    if not module.has_adapter(adapter_name):
                        if present:
                            missed.append(name)
                        continue
                    self._combine_layer(module, adapter_name, [adapters[i] for i in present],
                                        [weights[i] for i in present], combination_type, combination, **options)
        if missed:
            warnings.warn(
                f"The combined adapter {adapter_name!r} does not cover {missed}, where some sources do: its config is "
                f"based on {adapters[0]!r}'s exclude_modules / layers_to_transform. Those contributions are left out.",
                PeftWarning, stacklevel=2,
            )
        for param in self.model.parameters():
            param.requires_grad_(grads.get(param, False))  # the new adapter is frozen; the rest as it was

    @contextmanager
    def _undo_on_failure(self, adapter_name: str) -> Iterator[None]:
        targeted = list(self.targeted_module_names)
        try:
            with undo_on_failure(self.model, adapter_name, self.peft_config):
                yield
        except BaseException:
            self.targeted_module_names = targeted
            raise

    def _combined_config(self, adapters: list[str], combination_type: str, combination, svd_rank: int | None):
        """Validate the sources for ``combination_type`` and return the new adapter's config.

        Method hook of :meth:`add_weighted_adapter`, called before anything changes.
        ``combination`` is the registered :class:`~peft_kernel.plugins.Combination`, or
        ``None`` for one of the method's own :attr:`combination_types`. Return a new
        config (usually a modified copy of the first source's); the kernel then sets its
        ``target_modules`` (union of the sources'), ``modules_to_save`` (union) and custom
        layer mappings. Raise ``ValueError`` for sources that cannot be combined this way.
        """
        raise TypeError(self._no_combination_message())

    def _combine_layer(self, layer: AdapterLayer, adapter_name: str, sources: list[str], weights: list[float],
                       combination_type: str, combination, **options: Any) -> None:
        """Fill ``layer``'s (freshly created) ``adapter_name`` from ``sources``.

        Method hook of :meth:`add_weighted_adapter`, called under ``torch.no_grad()``
        for every adapter layer holding the new adapter, in ``named_modules()`` order.
        ``sources`` / ``weights`` are the sources present in this layer (possibly
        none) with their weights. ``options`` holds ``svd_clamp``,
        ``svd_full_matrices``, ``svd_driver``, ``density`` and ``majority_sign_method``;
        a registered strategy is called as ``combination.fn(tensors, weights,
        density=..., majority_sign_method=...)``.
        """
        raise TypeError(self._no_combination_message())

    def _no_combination_message(self) -> str:
        peft_type = next((c.peft_type for c in self.peft_config.values()), type(self).__name__)
        return (
            f"{peft_type} does not support add_weighted_adapter: its plugin implements no combination hooks "
            f"({type(self).__name__}._combined_config / _combine_layer)."
        )


_UNSET = object()


@contextmanager
def undo_on_failure(model: nn.Module, adapter_name: str, configs: dict | None = None) -> Iterator[None]:
    """Adding ``adapter_name`` to ``model`` inside the block is all or nothing: on an error,
    its entry in ``configs``, its tensors in every layer, the layers and ``modules_to_save``
    wrappers created for it, the model's ``peft_config`` attribute and every parameter's
    ``requires_grad`` are put back as they were. (Initialisations that rewrite base weights
    in place are not undone.)"""
    modules = list(adapter_modules(model))
    wrapped_before = {id(m) for _, m in modules}
    had_it = {id(m) for _, m in modules if adapter_name in m._all_available_adapter_names()}
    had_config = configs is not None and adapter_name in configs
    grads = {p: p.requires_grad for p in model.parameters()}
    model_configs = model.__dict__.get("peft_config", _UNSET)
    try:
        yield
    except BaseException:
        if configs is not None and not had_config:
            configs.pop(adapter_name, None)
        for _, module in list(adapter_modules(model)):
            if id(module) not in had_it:
                module.delete_adapter(adapter_name)
        _unwrap_new_modules(model, wrapped_before)
        for param, flag in grads.items():
            param.requires_grad_(flag)
        if model_configs is _UNSET:
            model.__dict__.pop("peft_config", None)
        else:
            model.__dict__["peft_config"] = model_configs
        raise


def _unwrap_new_modules(model: nn.Module, wrapped_before: set[int]) -> None:
    """Put back the modules that were there before, where a failed call had wrapped new (still
    empty) ones around them; layers that were already there (another method's, in a mixed
    model) stay."""
    def is_new(module):
        return id(module) not in wrapped_before and (
            isinstance(module, ModulesToSaveWrapper)
            or isinstance(module, AdapterLayer) and not module._all_available_adapter_names())

    removed: set[int] = set()
    for _, module, parent, attr in list(iter_modules_with_parent(model)):
        if parent is None or id(parent) in removed or not is_new(module):
            continue
        kept = module
        while is_new(kept):  # a chain of new layers (one per parameter) goes as a whole
            removed.add(id(kept))
            kept = kept.original_module if isinstance(kept, ModulesToSaveWrapper) else kept.base_layer
        setattr(parent, attr, kept)  # new layers inside ``kept`` (an attention's out_proj) come later


def combine_target_modules(values: list, field_name: str = "target_modules"):
    """Union of several adapters' target fields, for a combined adapter.

    All values must be of one kind: name sets/lists give their union, regex strings give
    ``"(t1)|(t2)|..."``, all ``None`` gives ``None``. Mixed kinds raise ``ValueError``.
    """
    kinds = {"regex" if isinstance(v, str) else "none" if v is None else "names" for v in values}
    if len(kinds) > 1:
        raise ValueError(
            f"All adapters must give `{field_name}` the same kind (all name lists or all regexes) to be combined; "
            f"got {sorted(kinds)}"
        )
    if kinds == {"regex"}:
        return "|".join(f"({v})" for v in values)
    if kinds == {"none"}:
        return None
    merged: set = set()
    for value in values:
        merged |= set(value)
    return merged


def _check_weights(weights, count: int) -> list[float]:
    if isinstance(weights, torch.Tensor):
        weights = weights.reshape(-1).tolist()
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise ValueError(f"weights must be a list of numbers, got {weights!r}") from None
    if len(values) != count:
        raise ValueError(f"Got {count} adapter(s) but {len(values)} weight(s); pass one weight per adapter")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"weights must be finite numbers, got {values}")
    return values


def _unload_nested(module: nn.Module, merge: bool, safe_merge: bool, adapter_names) -> None:
    """Adapter layers nested inside a base layer (e.g. an attention block's out_proj)."""
    for _, child, parent, attr in list(iter_modules_with_parent(module)):
        if parent is not None and isinstance(child, AdapterLayer):
            if merge:
                child.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            setattr(parent, attr, child.get_base_layer())


def _parameter_holders(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module, nn.Module | None, str]]:
    """``(name, holder, outermost, parent, attribute)`` for every module of ``model`` that can own
    targeted parameters, parents first. Parameter layers are seen through (``holder`` is the
    module they wrap, ``name`` its name without ``base_layer`` segments, ``outermost`` the module
    in the parent); the internals of other adapter layers and ``modules_to_save`` copies are
    skipped (their base is reported once, with the adapter layer as ``outermost``)."""
    stack: list[tuple[str, nn.Module, nn.Module | None, str]] = [("", model, None, "")]
    while stack:
        name, module, parent, attr = stack.pop()
        holder = module
        while isinstance(holder, ParameterLayer):
            holder = holder.base_layer
        if isinstance(holder, ModulesToSaveWrapper):
            continue
        if isinstance(holder, AdapterLayer):
            yield name, holder.get_base_layer(), holder, parent, attr
            continue
        yield name, holder, module, parent, attr
        for child_attr, child in reversed(list(holder._modules.items())):
            if child is not None:
                stack.append((f"{name}.{child_attr}" if name else child_attr, child, holder, child_attr))


def _parameter_layer_for(module: nn.Module, parameter_name: str) -> ParameterLayer | None:
    """The parameter layer adapting ``parameter_name`` in the chain starting at ``module``."""
    while isinstance(module, ParameterLayer):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def replicate_layers(model: nn.Module, layer_map: list[tuple[int, int]]) -> None:
    """Rebuild the model's stack of layers from ``[start, end)`` ranges of the original one
    (``[[0, 4], [2, 5]]`` on 5 layers gives 0 1 2 3 2 3 4). Repeated layers are copies that
    share every parameter with their original, so each copy can get its own adapter while the
    base weights stay single. The stack is the ``nn.ModuleList`` at ``layers`` (descending through
    ``.model``), ``encoder.layer`` or ``h``; ``layer_idx`` attributes (used by key/value caches)
    and ``config.num_hidden_layers`` follow the new order."""
    root = model
    while isinstance(getattr(root, "model", None), nn.Module):
        root = root.model
    if isinstance(getattr(root, "bert", None), nn.Module):
        root = root.bert
    for owner, attr in ((root, "layers"), (getattr(root, "encoder", None), "layer"), (root, "h")):
        layers = getattr(owner, attr, None)
        if isinstance(layers, nn.ModuleList):
            break
    else:
        raise ValueError(
            "layer_replication needs the model's layers as an nn.ModuleList at `layers` (under `.model`), "
            "`encoder.layer` or `h`; none was found in this model"
        )
    for start, end in layer_map:
        if not 0 <= start < end <= len(layers):
            raise ValueError(f"layer_replication range [{start}, {end}) does not fit the model's {len(layers)} layers")
    copies = []
    for start, end in layer_map:
        for index in range(start, end):
            copy_ = _shared_copy(layers[index])
            for module in copy_.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(copies)
            copies.append(copy_)
    setattr(owner, attr, nn.ModuleList(copies))
    config = getattr(root, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        _replicate_config(config, layer_map)


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's (buffers are copied)."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _replicate_config(config, layer_map) -> None:
    """``num_hidden_layers`` and per-layer lists (``layer_types``) of a transformers config."""
    old = config.num_hidden_layers
    indices = [i for start, end in layer_map for i in range(start, end)]
    config.num_hidden_layers = len(indices)
    per_layer = getattr(config, "layer_types", None)
    if isinstance(per_layer, list) and len(per_layer) == old:
        config.layer_types = [per_layer[i] for i in indices]


def _check_resolved(config, given) -> None:
    """The config still passes its own checks now that its targets are names (a config whose
    checks compare other fields with ``target_modules`` would save, but not load again)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataclasses.replace(config)
    except ValueError as exc:
        raise ValueError(f"{exc} (target_modules {_describe_targets(given)} resolved to "
                         f"{_describe_targets(config.target_modules)} in this model)") from None


#: per-module override fields of method configs (``{module name or regex: value}``)
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


def _warn_unmatched_patterns(config, targeted: list[str]) -> None:
    """A ``rank_pattern`` / ``alpha_pattern`` key that no adapted module matches is most likely
    a typo: say so (HF PEFT warns too)."""
    for field in PATTERN_FIELDS:
        patterns = getattr(config, field, None)
        if not isinstance(patterns, dict):
            continue
        unmatched = [key for key in patterns if not any(targeting.get_pattern_key([key], name) == key
                                                         for name in targeted)]
        if unmatched:
            warnings.warn(f"These {field} keys match no adapted module and were ignored: {unmatched}. Check them "
                          "against the adapted module names.", PeftWarning, stacklevel=4)


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
