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

from . import status as _status
from .auxiliary import ModulesToSaveWrapper
from .config import PeftConfig, TaskType
from .errors import PeftWarning
from .hub import split_hub_kwargs, write_model_card
from .layer import BASE_ADAPTER, AdapterLayer
from .plugins import manager
from .state_dict import (
    get_peft_model_state_dict,
    load_peft_weights,
    save_weights,
    set_peft_model_state_dict,
)
from .tuner import BaseTuner, adapter_modules

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

        for layer in layers:
            layer.__dict__["_call_state"] = view
        handle = self.get_base_model().register_forward_pre_hook(refresh, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for layer in layers:
                layer.__dict__["_call_state"] = None

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
        modules += [m for _, m in self.base_model.model.named_modules() if isinstance(m, AdapterLayer)]
        for module in modules:
            if isinstance(module, AdapterLayer):
                if module.merged:
                    raise ValueError("adapter_names cannot be used while adapters are merged; unmerge_adapter() first")
                if not module.supports_mixed_batch and module.has_adapter_any(set(adapter_names)):
                    raise TypeError(f"{type(module).__name__} layers do not support mixed adapter batches")
        if any(getattr(m, "disable_adapters", False) for m in modules):
            adapter_names = [BASE_ADAPTER] * len(adapter_names)
        for module in modules:
            module._set_batch_adapter_names(list(adapter_names))
        try:
            yield
        finally:
            for module in modules:
                module._set_batch_adapter_names(None)

    @contextmanager
    def disable_adapter(self):
        """Run the base model: all adapters are off inside the ``with`` block."""
        if self._is_prompt_learning:
            with self.prompt_learning.disabled():
                yield
            return
        states = [m.disable_adapters for _, m in adapter_modules(self.base_model.model)]
        if states and len(set(states)) > 1:
            warnings.warn("Adapter layers were in irregular enabled states; all are enabled on exit.",
                          PeftWarning, stacklevel=3)
        self.base_model.disable_adapter_layers()
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers()

    # -- adapter management -----------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new (inactive) adapter of the same method; rolled back on failure."""
        self._check_method_of(peft_config)
        if adapter_name in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} already exists; delete_adapter() it first or pick another name")
        _check_adapter_name(adapter_name, peft_config)
        if self._is_prompt_learning:
            self._prepare_task_config(peft_config)
            self.peft_config[adapter_name] = peft_config
            try:
                self.prompt_learning.add(adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)
            except BaseException:
                del self.peft_config[adapter_name]
                raise
            return
        self._prepare_task_config(peft_config)
        tuner = self.base_model
        active = tuner.active_adapter
        tuner.peft_config[adapter_name] = peft_config
        try:
            tuner.inject_adapter(tuner.model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            if adapter_name in tuner.peft_config:
                del tuner.peft_config[adapter_name]
            for _, module in list(adapter_modules(tuner.model)):
                module.delete_adapter(adapter_name)
            self._restore_active(active)
            raise
        if self._active_frozen(active) != peft_config.inference_mode:  # else injection already left it so
            self._restore_active(active)

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

    def set_adapter(self, adapter_name: str) -> None:
        """Activate exactly one adapter and make it trainable (unless inference mode)."""
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
            self.base_model.set_adapter(adapter_name, inference_mode=self.peft_config[adapter_name].inference_mode)

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
                        selected_adapters: list[str] | None = None, save_embedding_layers="auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs: Any) -> None:
        """Write each adapter in HF PEFT's format: ``default`` at the top level, others in
        ``<save_directory>/<name>/``. Everything is computed before anything is written,
        and each file is replaced atomically."""
        if os.path.isfile(save_directory):
            raise ValueError(f"Provided path ({save_directory}) should be a directory, not a file")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Cannot save unknown adapters {unknown}; available: {sorted(self.peft_config)}")
        if path_initial_model_for_weight_conversion is not None:
            raise NotImplementedError("path_initial_model_for_weight_conversion is not supported yet")
        plans = []
        for name in names:
            state = get_peft_model_state_dict(self, state_dict=kwargs.get("state_dict"), adapter_name=name,
                                              save_embedding_layers=save_embedding_layers)
            config = copy.deepcopy(self.peft_config[name])
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(self.get_base_model(), "name_or_path", None) or None
            config.inference_mode = True
            extra = {}
            if config.task_type is None:
                base_cls = type(self.get_base_model())
                extra["auto_mapping"] = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            plans.append((out, state, config, extra))
        if not is_main_process:
            return
        for out, state, config, extra in plans:
            os.makedirs(out, exist_ok=True)
            save_weights(state, out, safe_serialization=safe_serialization)
            config.save_pretrained(out, extra=extra)
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
        ``huggingface_hub.hf_hub_download``)."""
        hub_kwargs, _ = split_hub_kwargs(kwargs)
        if config is None:
            config = PeftConfig.from_pretrained(model_id, **hub_kwargs)
        elif not isinstance(config, PeftConfig):
            raise ValueError(f"config must be a PeftConfig, got {type(config).__name__}")
        # prompt encoders are built in the layout their checkpoint holds (inference mode); a
        # trainable load unfreezes that afterwards (load_adapter)
        config.inference_mode = not is_trainable or config.is_prompt_learning
        target_cls = cls
        if cls is PeftModel and config.task_type in MODEL_TYPE_TO_PEFT_MODEL_MAPPING:
            target_cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[config.task_type]
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                low_cpu_mem_usage=low_cpu_mem_usage)
        result = peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable,
                                         autocast_adapter_dtype=autocast_adapter_dtype,
                                         low_cpu_mem_usage=low_cpu_mem_usage, key_mapping=key_mapping,
                                         _created=True, **kwargs)
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
        hub_kwargs, kwargs = split_hub_kwargs(kwargs)
        weights = load_peft_weights(model_id, device=torch_device, key_mapping=key_mapping, **hub_kwargs)
        added = not created and adapter_name not in self.peft_config
        if added:
            config = kwargs.get("config") or PeftConfig.from_pretrained(model_id, **hub_kwargs)
            config.inference_mode = not is_trainable or config.is_prompt_learning
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
        try:
            result = set_peft_model_state_dict(self, weights, adapter_name=adapter_name,
                                               ignore_mismatched_sizes=kwargs.get("ignore_mismatched_sizes", False),
                                               low_cpu_mem_usage=low_cpu_mem_usage)
        except BaseException:
            if added:
                self.delete_adapter(adapter_name)
            raise
        if created or added:  # an adapter that was there keeps its trainability
            if not is_trainable:
                self.set_requires_grad_false(adapter_name)
            elif self._is_prompt_learning:
                self.prompt_learning.unfreeze(adapter_name)
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


def _batch_size(kwargs) -> int | None:
    for name in ("input_ids", "inputs_embeds", "x", "input"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _check_adapter_name(adapter_name: str, config: PeftConfig) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter name must be a non-empty string, got {adapter_name!r}")
    if "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} must not contain '.'; it is used as a key segment")
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
