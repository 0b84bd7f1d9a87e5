"""Entry functions: ``get_peft_model``, ``inject_adapter_in_model``, ``get_peft_config``."""

from __future__ import annotations

import warnings

from torch import nn

from .config import PeftConfig
from .errors import PeftWarning
from .layer import AdapterLayer
from .mixed import PeftMixedModel, check_mixed_compatible
from .peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftModel
from .plugins import manager
from .tuner import check_adapter_name


def get_peft_config(config_dict: dict) -> PeftConfig:
    """Build the registered config class for ``config_dict["peft_type"]``."""
    if not isinstance(config_dict, dict):
        raise TypeError(f"get_peft_config takes a dict of config fields, got {type(config_dict).__name__}")
    return PeftConfig.from_peft_type(**config_dict)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` (in place) with a new, trainable adapter described by ``peft_config``.

    Returns the task class for ``peft_config.task_type`` (plain :class:`PeftModel` when
    it is unset), or with ``mixed=True`` a :class:`~peft_kernel.mixed.PeftMixedModel`, which
    takes further adapters of other methods. Use :meth:`PeftModel.from_pretrained` to load
    trained adapters.
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig (e.g. a method's config class), got "
                        f"{type(peft_config).__name__}; build one from a dict with get_peft_config()")
    check_adapter_name(adapter_name)
    if mixed:
        check_mixed_compatible(peft_config)  # before anything changes
    name_or_path = (
        getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    )
    if name_or_path:
        if peft_config.base_model_name_or_path not in (None, name_or_path):
            warnings.warn(f"base_model_name_or_path {peft_config.base_model_name_or_path!r} is replaced by the "
                          f"model's name_or_path {name_or_path!r}.", PeftWarning, stacklevel=2)
        peft_config.base_model_name_or_path = name_or_path
    if revision is not None:
        peft_config.revision = revision
    if any(isinstance(m, AdapterLayer) for m in model.modules()):
        warnings.warn("The model already contains adapter layers; call .unload() on it first if you want a clean "
                      "base model.", PeftWarning, stacklevel=2)
    cls = PeftMixedModel if mixed else MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: dict | None = None) -> nn.Module:
    """Add adapter layers to any ``nn.Module`` in place and return it (no PeftModel wrapper).

    With ``state_dict``, its keys decide which modules are adapted (values are not loaded).
    """
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a PeftConfig, got {type(peft_config).__name__}")
    if peft_config.is_prompt_learning:
        raise ValueError("inject_adapter_in_model does not support prompt learning methods; use get_peft_model")
    spec = manager().method(peft_config.peft_type)
    tuner = spec.model_cls(model, peft_config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                           state_dict=state_dict)
    return tuner.model
