"""``PeftModel`` and its task classes: the user-facing wrapper, for every method."""

from __future__ import annotations

import copy
import os
import warnings
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import io
from . import status as _status
from .auxiliary import ModulesToSaveWrapper
from .config import CONFIG_NAME, PeftConfig, TaskType
from .errors import PeftWarning
from .hub import split_hub_kwargs, write_model_card
from .layer import BASE_ADAPTER, AdapterLayer, mixed_batch, with_call_state
from .plugins import manager
from .state_dict import (
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
    weights_file_names,
    write_weights,
)
from .tuner import BaseTuner, adapter_modules, check_adapter_name, undo_on_failure

SPECIAL_FORWARD_ARGS = {"adapter_names"}


class PeftModel(nn.Module):
    """A base model with adapters of one method (HF PEFT's ``PeftModel``).

    ``base_model`` is the method's tuner (or, for prompt learning, the model itself);
    ``peft_config`` maps adapter names to configs. Attributes it does not have are looked
    up on the tuner and then on the wrapped model.
    """

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        super().__init__()
        _check_adapter_name(adapter_name, peft_config)
        self.active_adapter = adapter_name
        self.peft_type = peft_config.peft_type
        self.special_peft_forward_args = set(SPECIAL_FORWARD_ARGS)
        self._is_prompt_learning = peft_config.is_prompt_learning
        spec = manager().method(peft_config.peft_type)
        if self._is_prompt_learning:
            from .prompt_learning import PromptLearning

            self._peft_config = {adapter_name: peft_config}
            self.base_model = model
            self.prompt_learning = PromptLearning(self)
            self.prompt_learning.add(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            self._peft_config = None
            self.base_model = spec.model_cls(model, {adapter_name: peft_config}, adapter_name,
                                             low_cpu_mem_usage=low_cpu_mem_usage,
                                             autocast_adapter_dtype=autocast_adapter_dtype)
            self.special_peft_forward_args |= set(getattr(self.base_model, "special_forward_args", ()))
        if getattr(model, "name_or_path", None) and peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = model.name_or_path
        if hasattr(self.base_model, "config") and hasattr(self.base_model.config, "pretraining_tp"):
            self.base_model.config.pretraining_tp = 1

    # -- attribute plumbing -----------------------------------------------------------

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        if self._is_prompt_learning:
            return self._peft_config
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: dict[str, PeftConfig]) -> None:
        if self._is_prompt_learning:
            self._peft_config = value
        else:
            self.base_model.peft_config = value

    @property
    def active_adapters(self) -> list[str]:
        if self._is_prompt_learning:
            return [self.active_adapter]
        return self.base_model.active_adapters

    @property
    def has_active_enabled_adapter(self) -> bool:
        """Whether a forward now applies an adapter: one is active and adapters are not
        disabled (``disable_adapter()``, ``disable_adapter_layers()``)."""
        if self._is_prompt_learning:
            return not self.prompt_learning._disabled
        return any(not m.disable_adapters and m.active_adapters for _, m in adapter_modules(self.base_model.model))

    @property
    def active_peft_config(self) -> PeftConfig:
        return self.peft_config[self.active_adapter if isinstance(self.active_adapter, str) else self.active_adapter[0]]

    @property
    def modules_to_save(self) -> set[str] | None:
        names: set[str] = set()
        for config in self.peft_config.values():
            names.update(getattr(config, "modules_to_save", None) or ())
        return names or None

    @property
    def targeted_module_names(self) -> list[str]:
        return list(getattr(self.base_model, "targeted_module_names", []))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_peft_config", "_is_prompt_learning", "prompt_learning"):
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model if self._is_prompt_learning else self.base_model.model

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The active adapter's virtual-token embeddings (prompt learning only)."""
        return self._check_prompt_learning("get_prompt").get_prompt(batch_size, task_ids=task_ids)

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """The virtual-token embeddings of ``adapter_name`` as saved (prompt learning only)."""
        return self._check_prompt_learning("get_prompt_embedding_to_save").get_prompt_embedding_to_save(adapter_name)

    def _check_prompt_learning(self, what: str):
        if not self._is_prompt_learning:
            raise TypeError(f"{what} is only available for prompt learning methods, not {self.peft_type}")
        return self.prompt_learning

    # -- forward and generate ---------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._enable_peft_forward_hooks(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            if self._is_prompt_learning:
                return self._prompt_forward(*args, **kwargs)
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with self._enable_peft_forward_hooks(*args, generating=True, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in self.special_peft_forward_args}
            if self._is_prompt_learning:
                return self._prompt_generate(*args, **kwargs)
            return self.get_base_model().generate(*args, **kwargs)

    def _prompt_forward(self, *args, **kwargs):
        return self.prompt_learning.forward(*args, **kwargs)

    def _prompt_generate(self, *args, **kwargs):
        return self.prompt_learning.generate(*args, **kwargs)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, generating: bool = False, **kwargs):
        """Route per-call values to every adapter layer for one call: ``adapter_names`` (one
        per sample) and whatever the tuner's ``per_call_state`` computes."""
        step = None if self._is_prompt_learning else self.base_model.per_call_state(args, kwargs,
                                                                                   generating=generating)
        if step is None and (self._is_prompt_learning or kwargs.get("adapter_names") is None):
            yield  # the common case: nothing to route
            return
        with self._mixed_batch(generating, kwargs), self._call_state(step):
            yield

    @contextmanager
    def _call_state(self, step):
        """Before every forward of the base model, ``step`` computes the values layers read as
        ``call_state``; they are dropped when the call returns."""
        if step is None:
            yield
            return
        state: dict = {}
        view = MappingProxyType(state)
        layers = [m for _, m in self.base_model.model.named_modules() if isinstance(m, AdapterLayer)]

        def refresh(module, args, step_kwargs):
            state.clear()
            state.update(step(args, step_kwargs))

        handle = self.get_base_model().register_forward_pre_hook(refresh, with_kwargs=True)
        try:
            with with_call_state(layers, view):  # per call: concurrent calls do not see each other's
                yield
        finally:
            handle.remove()

    @contextmanager
    def _mixed_batch(self, generating: bool, kwargs):
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str):
            raise TypeError("adapter_names must be a list with one adapter name per sample")
        known = set(self.peft_config) | {BASE_ADAPTER}
        unknown = sorted(set(adapter_names) - known)
        if unknown:
            raise ValueError(
                f"Unknown adapter names in adapter_names: {unknown}; available: {sorted(self.peft_config)}"
            )
        if self.training:
            raise ValueError("adapter_names (mixed adapter batches) is for inference; call model.eval() first")
        batch = _batch_size(kwargs)
        beams = kwargs.get("num_beams") or 1
        if generating and beams > 1:  # generate expands each sample into num_beams rows
            adapter_names = [name for name in adapter_names for _ in range(beams)]
            batch = batch * beams if batch is not None else None
        if batch is not None and batch != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} samples; "
                             "give one adapter name per sample")
        modules = [m for _, m in adapter_modules(self.base_model.model)]
        for module in modules:
            if isinstance(module, AdapterLayer):
                if module.merged:
                    raise ValueError("adapter_names cannot be used while adapters are merged; unmerge_adapter() first")
                if not module.supports_mixed_batch and module.has_adapter_any(set(adapter_names)):
                    raise TypeError(f"{type(module).__name__} layers do not support mixed adapter batches")
        if any(getattr(m, "disable_adapters", False) for m in modules):
            adapter_names = [BASE_ADAPTER] * len(adapter_names)
        with mixed_batch(modules, adapter_names):  # per call: concurrent calls do not see each other's
            yield

    @contextmanager
    def disable_adapter(self):
        """Run the base model: all adapters are off inside the ``with`` block. On exit every
        layer is enabled or disabled as before the block, with the same trainability flags,
        so the context nests and leaves a model whose adapters were already off as it was."""
        if self._is_prompt_learning:
            with self.prompt_learning.disabled():
                yield
            return
        states = [(m, m.disable_adapters) for _, m in adapter_modules(self.base_model.model)]
        flags = [(p, p.requires_grad) for p in self.parameters()]
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            for module, was_disabled in states:
                if module.disable_adapters != was_disabled:
                    module.enable_adapters(not was_disabled)
            for param, flag in flags:
                param.requires_grad_(flag)

    # -- adapter management -----------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new (inactive, frozen) adapter of the same method; rolled back on failure. The
        trainability of everything else is left as it was."""
        self._check_method_of(peft_config)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        _check_adapter_name(adapter_name, peft_config)
        self._prepare_task_config(peft_config)
        flags = {p: p.requires_grad for p in self.parameters()}
        with self._all_or_nothing(adapter_name):
            if self._is_prompt_learning:
                self.peft_config[adapter_name] = peft_config
                self.prompt_learning.add(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
                return
            tuner = self.base_model
            tuner.peft_config[adapter_name] = peft_config
            tuner.inject_adapter(tuner.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                                 autocast_adapter_dtype=autocast_adapter_dtype)
        _restore_flags(self, flags)  # injection re-activates the active adapters; keep the user's flags

    @contextmanager
    def _all_or_nothing(self, adapter_name: str):
        """Adding ``adapter_name`` inside the block either completes or leaves the model as it was."""
        if self._is_prompt_learning:
            try:
                yield
            except BaseException:
                if adapter_name in self.prompt_learning.encoders:
                    self.delete_adapter(adapter_name)
                self.peft_config.pop(adapter_name, None)
                raise
            return
        active = self.base_model.active_adapter
        grads = {p: p.requires_grad for p in self.parameters()}
        try:
            with self.base_model._undo_on_failure(adapter_name):
                yield
        except BaseException:
            self._restore_active(active)
            for param, flag in grads.items():
                param.requires_grad_(flag)
            raise

    def _check_method_of(self, peft_config: PeftConfig) -> None:
        """Raise if an adapter of ``peft_config``'s method cannot join this model."""
        if peft_config.peft_type != self.peft_type:
            raise ValueError(
                f"Cannot add a {peft_config.peft_type} adapter to a {self.peft_type} model; a PeftModel holds one "
                "method (use a mixed model for several: get_peft_model(..., mixed=True))."
            )

    def _active_frozen(self, active) -> bool:
        names = [active] if isinstance(active, str) else list(active)
        return all(self.peft_config[n].inference_mode for n in names if n in self.peft_config)

    def _restore_active(self, active) -> None:
        self.base_model.set_adapter(active, inference_mode=self._active_frozen(active))

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Activate exactly one adapter and make it trainable (unless ``inference_mode`` or its
        config's inference mode)."""
        if not isinstance(adapter_name, str):
            raise ValueError(
                "PeftModel.set_adapter takes one adapter name; use base_model.set_adapter([...]) for several"
            )
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; available: {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        if self._is_prompt_learning:
            self.prompt_learning.set_adapter(adapter_name)
        else:
            frozen = inference_mode or self.peft_config[adapter_name].inference_mode
            self.base_model.set_adapter(adapter_name, inference_mode=frozen)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; available: {sorted(self.peft_config)}")
        if self._is_prompt_learning:
            self.prompt_learning.delete(adapter_name)
            del self.peft_config[adapter_name]
        else:
            self.base_model.delete_adapter(adapter_name)
        if self.active_adapter == adapter_name or adapter_name in (self.active_adapter or []):
            self.active_adapter = self.base_model.active_adapter if not self._is_prompt_learning else next(
                iter(self.peft_config), None)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        if self._is_prompt_learning:
            raise TypeError("set_requires_grad is not supported for prompt learning methods")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {unknown} not found; available: {sorted(self.peft_config)}")
        for _, module in adapter_modules(self.base_model.model):
            if isinstance(module, ModulesToSaveWrapper):
                for name in names:
                    if name in module.modules_to_save:
                        module.modules_to_save[name].requires_grad_(requires_grad)
                continue
            for attr in module.adapter_layer_names:
                container = getattr(module, attr)
                for name in names:
                    if name in container:
                        container[name].requires_grad_(requires_grad)

    # -- merging (forwarded to the tuner) ---------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self._check_tuner("merge_adapter").merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._check_tuner("unmerge_adapter").unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        return self._check_tuner("merge_and_unload").merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self._check_tuner("unload").unload()

    def _check_tuner(self, what: str) -> BaseTuner:
        if self._is_prompt_learning:
            raise TypeError(f"{what} is not available for prompt learning methods ({self.peft_type})")
        return self.base_model

    # -- parameters and status --------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return _status.count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def get_layer_status(self):
        return _status.get_layer_status(self)

    def get_model_status(self):
        return _status.get_model_status(self)

    # -- saving and loading -----------------------------------------------------------

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: list[str] | str | None = None, save_embedding_layers="auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs: Any) -> None:
        """Write each adapter in HF PEFT's format: ``default`` at the top level, others in
        ``<save_directory>/<name>/``. Everything is computed before anything is written.
        Each adapter directory is replaced as a whole, crash-consistently, and concurrent
        saves into ``save_directory`` run one after the other (see :mod:`peft_kernel.io`)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        if not self.peft_config:
            raise ValueError("This model has no adapter left to save (all were deleted); add or load one first")
        if isinstance(selected_adapters, str):
            selected_adapters = [selected_adapters]
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        if not names:
            raise ValueError("selected_adapters is empty, so there is nothing to save; pass None to save every adapter "
                             f"or some of {sorted(self.peft_config)}")
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Cannot save unknown adapters {unknown}; available: {sorted(self.peft_config)}")
        for name in names:
            check_adapter_name(name)  # a name is a directory name here: never a path out of save_directory
        plans = []
        for name in names:
            state = get_peft_model_state_dict(self, state_dict=kwargs.get("state_dict"), adapter_name=name,
                                              save_embedding_layers=save_embedding_layers)
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(self.get_base_model(), "name_or_path", None) or None
            config.inference_mode = True
            if path_initial_model_for_weight_conversion is not None:
                state, config = self._check_tuner("path_initial_model_for_weight_conversion").save_relative_to_initial(
                    self, name, config, state, path_initial_model_for_weight_conversion)
            extra = {}
            if config.task_type is None:
                base_cls = type(self.get_base_model())
                extra["auto_mapping"] = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            plans.append((out, state, config, extra))
        if not is_main_process:
            return
        weights_name, other_format = weights_file_names(safe_serialization)
        with io.locked(save_directory, exclusive=True):
            for out, state, config, extra in plans:
                with io.staged(out, remove=[other_format]) as stage:
                    write_weights(state, os.path.join(stage, weights_name), safe_serialization=safe_serialization)
                    config.write_json(os.path.join(stage, CONFIG_NAME), extra=extra)
            self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir: str) -> None:
        """Write (or update) ``README.md`` with the metadata HF PEFT gives an adapter: library
        ``peft``, the base model, tags (the base model's own, ``transformers``, the methods,
        ``base_model:adapter:<base>``) and, for causal LMs, the ``text-generation`` pipeline."""
        base = self.get_base_model()
        base_name = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        tags = set(getattr(base, "model_tags", None) or ())
        tags |= {str(c.peft_type).lower() for c in self.peft_config.values()}
        if type(base).__module__.startswith("transformers"):
            tags.add("transformers")
        name_or_path = getattr(base, "name_or_path", None)
        if name_or_path:
            tags.add(f"base_model:adapter:{name_or_path}")
        metadata: dict[str, Any] = {"library_name": "peft"}
        if base_name:
            metadata["base_model"] = base_name
        metadata["tags"] = sorted(tags)
        if isinstance(self, PeftModelForCausalLM):
            metadata["pipeline_tag"] = "text-generation"
        write_model_card(output_dir, metadata, self.active_peft_config.peft_version)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None, create_pr: bool = False,
                    safe_serialization: bool = True, **save_kwargs: Any):
        """Save the adapters (as :meth:`save_pretrained` does, model card included) and upload
        them to the Hub repo ``repo_id``, creating it if needed. Returns huggingface_hub's
        ``CommitInfo``."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, safe_serialization=safe_serialization, **save_kwargs)
            return api.upload_folder(repo_id=repo.repo_id, folder_path=tmp, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or "Upload adapter")

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, ephemeral_gpu_offload: bool = False,
                        low_cpu_mem_usage: bool = False, key_mapping: dict | None = None, **kwargs: Any):
        """Load a saved adapter (ours or HF PEFT's) onto ``model``, from a directory or a Hub repo
        id (``subfolder``, ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ... as in
        ``huggingface_hub.hf_hub_download``). If loading fails, ``model`` is left as it was."""
        check_adapter_name(adapter_name)
        hub_kwargs, _ = split_hub_kwargs(kwargs)
        with io.locked(_adapter_dir(model_id, hub_kwargs.get("subfolder"))):  # config and weights of one save
            if config is None:
                config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
            elif not isinstance(config, PeftConfig):
                raise ValueError(f"config must be a PeftConfig, got {type(config).__name__}")
            # prompt encoders are built in the layout their checkpoint holds (inference mode); a
            # trainable load unfreezes that afterwards (load_adapter)
            config.inference_mode = not is_trainable or config.is_prompt_learning
            if key_mapping is None and not config.is_prompt_learning:
                # transformers renames the keys of checkpoints saved before an architecture changed
                # (``_checkpoint_conversion_mapping``); adapters saved then need the same renames
                key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
            target_cls = cls
            if cls is PeftModel and config.task_type in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
                target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type]
            weights = load_peft_weights(model_id, device=kwargs.get("torch_device"), key_mapping=key_mapping,
                                        **hub_kwargs)
        with undo_on_failure(model, adapter_name):
            peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
            result = peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                             autocast_adapter_dtype=autocast_adapter_dtype,
                                             low_cpu_mem_usage=low_cpu_mem_usage, _created=True, _weights=weights,
                                             **kwargs)
        missing = [k for k in result.missing_keys if adapter_name in k.split(".")]
        if missing:
            warnings.warn(f"Found missing adapter keys while loading the checkpoint: {missing}", PeftWarning,
                          stacklevel=2)
        if result.unexpected_keys:
            warnings.warn(f"Unexpected keys in the checkpoint were ignored: {result.unexpected_keys}", PeftWarning,
                          stacklevel=2)
        return peft_model

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     torch_device: str | None = None, autocast_adapter_dtype: bool = True,
                     ephemeral_gpu_offload: bool = False, low_cpu_mem_usage: bool = False,
                     key_mapping: dict | None = None, **kwargs: Any):
        """Load a saved adapter (a directory or a Hub repo id) as ``adapter_name``; a new adapter
        is not activated. Loading into an existing adapter replaces its weights and leaves its
        trainability alone (transformers' Trainer does that to resume from a checkpoint and to
        load the best one). Returns the load result (``missing_keys``, ``unexpected_keys``)."""
        created = kwargs.pop("_created", False)
        weights = kwargs.pop("_weights", None)
        hub_kwargs, kwargs = split_hub_kwargs(kwargs)
        check_adapter_name(adapter_name)
        added = not created and adapter_name not in self.peft_config
        with io.locked(_adapter_dir(model_id, hub_kwargs.get("subfolder"))):  # config and weights of one save
            if weights is None:
                weights = load_peft_weights(model_id, device=torch_device, key_mapping=key_mapping, **hub_kwargs)
            if added:
                config = kwargs.get("config") or PeftConfig.from_pretrained(model_id, **hub_kwargs)
        if not added:  # from_pretrained's adapter (it undoes the whole model on failure) or one that was there
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                               ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        else:
            if not isinstance(config, PeftConfig):
                raise ValueError(f"config must be a PeftConfig, got {type(config).__name__}")
            config.inference_mode = not is_trainable or config.is_prompt_learning
            with self._all_or_nothing(adapter_name):
                self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage,
                                 autocast_adapter_dtype=autocast_adapter_dtype)
                if is_trainable and not self._is_prompt_learning:
                    self.set_requires_grad(adapter_name)  # add_adapter leaves a new adapter frozen
                result = set_peft_model_state_dict(
                    self, weights, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                    ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False))
        if created or added:  # an adapter that was there keeps its trainability
            if not is_trainable:
                self.set_requires_grad_false(adapter_name)
            elif self._is_prompt_learning:
                self.prompt_learning.unfreeze(adapter_name)
        if not is_trainable:
            self.eval()  # an adapter loaded for inference runs without dropout, as in HF PEFT
        return result

    def set_requires_grad_false(self, adapter_name: str) -> None:
        if self._is_prompt_learning:
            self.prompt_learning.freeze(adapter_name)
            return
        for name, param in self.base_model.model.named_parameters():
            if adapter_name in name.split("."):
                param.requires_grad_(False)

    def _prepare_task_config(self, peft_config: PeftConfig) -> None:
        """Task classes add their head to ``modules_to_save`` here."""


def _adapter_dir(model_id, subfolder: str | None) -> str:
    return os.path.join(model_id, subfolder) if subfolder else model_id


def _restore_flags(model: nn.Module, flags: dict[nn.Parameter, bool]) -> None:
    """Put back the ``requires_grad`` flags of ``flags``; parameters not in it are frozen."""
    for param in model.parameters():
        param.requires_grad_(flags.get(param, False))


def _batch_size(kwargs) -> int | None:
    for name in ("input_ids", "inputs_embeds", "x", "input"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _check_adapter_name(adapter_name: str, config: PeftConfig) -> None:
    check_adapter_name(adapter_name)
    try:
        prefix = manager().method(config.peft_type).prefix
    except ValueError:
        return
    if prefix and prefix.rstrip("_") and prefix.rstrip("_") in adapter_name:
        warnings.warn(
            f"Adapter name {adapter_name!r} contains the prefix {prefix!r} of {config.peft_type}; this can make its "
            "parameters hard to tell apart. Consider another name.",
            PeftWarning,
            stacklevel=3,
        )


# The task classes name their inputs (HF PEFT's signatures, in its order), so that tools that
# read ``forward``'s signature, such as transformers' Trainer choosing dataset columns and label
# names, see them. ``input_ids`` goes on positionally, everything else given by keyword.


def _task_forward(model: PeftModel, input_ids, named: dict[str, Any], kwargs: dict[str, Any]) -> Any:
    named = {k: v for k, v in named.items() if v is not None}
    if not model._is_prompt_learning:
        named.pop("task_ids", None)  # only prompt-learning methods with several tasks use it
    args = () if input_ids is None else (input_ids,)
    return PeftModel.forward(model, *args, **named, **kwargs)


def _labelled_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                      output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    """``forward`` of the causal-LM and classification task classes."""
    return _task_forward(self, input_ids, dict(
        attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
        task_ids=task_ids), kwargs)


class PeftModelForCausalLM(PeftModel):
    forward = _labelled_forward


class PeftModelForSeq2SeqLM(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, input_ids, dict(
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            task_ids=task_ids), kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, input_ids, dict(
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=return_dict, task_ids=task_ids), kwargs)


class _HeadModel(PeftModel):
    """Task models whose head must train with the adapter (added to modules_to_save)."""

    head_names: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any):
        self._prepare_task_config_static(peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    @classmethod
    def _prepare_task_config_static(cls, peft_config: PeftConfig) -> None:
        if not hasattr(peft_config, "modules_to_save"):
            return
        if peft_config.modules_to_save is None:
            peft_config.modules_to_save = list(cls.head_names)
        else:
            # appended even when already listed: adapter_config.json stays identical to HF PEFT's
            peft_config.modules_to_save = list(peft_config.modules_to_save) + list(cls.head_names)

    def _prepare_task_config(self, peft_config: PeftConfig) -> None:
        self._prepare_task_config_static(peft_config)


class _ClassificationModel(_HeadModel):
    head_names = ("classifier", "score")
    forward = _labelled_forward


class PeftModelForSequenceClassification(_ClassificationModel):
    pass


class PeftModelForTokenClassification(_ClassificationModel):
    pass


class PeftModelForQuestionAnswering(_HeadModel):
    head_names = ("qa_outputs",)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs):
        return _task_forward(self, input_ids, dict(
            attention_mask=attention_mask, token_type_ids=token_type_ids, position_ids=position_ids,
            inputs_embeds=inputs_embeds, start_positions=start_positions, end_positions=end_positions,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            task_ids=task_ids), kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}
