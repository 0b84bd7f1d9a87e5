"""peft-kernel: Hugging Face PEFT's API and checkpoint format on a small plugin kernel.

Methods and quantization backends are plugins found through the
``peft_kernel`` entry-point group; see :mod:`peft_kernel.hookspecs` for the contract.

Importing this package does not import torch: configs, errors, ``hookimpl`` and the
plugin registry are loaded eagerly (they are torch-free), everything else (layers,
tuners, ``get_peft_model``, ``PeftModel``, ...) is imported on first attribute access
(PEP 562), so ``import peft_kernel`` and plugin discovery stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import LowRankDeltaConfig, PeftConfig, PeftType, PromptLearningConfig, TaskType, TunerConfig
from .dispatch import register_layer_mapping, unregister_layer_mapping
from .errors import (
    MergeNotSupportedError,
    NoMatchingPeftModuleError,
    PeftWarning,
    StateDictMismatchError,
    UnsupportedFeatureError,
    UnsupportedOptionError,
)
from .lazy import lazy_attributes
from .plugins import hookimpl, register_peft_method

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from .auto import (
        AutoPeftModel,
        AutoPeftModelForCausalLM,
        AutoPeftModelForFeatureExtraction,
        AutoPeftModelForQuestionAnswering,
        AutoPeftModelForSeq2SeqLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
    )
    from .auxiliary import ModulesToSaveWrapper
    from .delta import WeightDeltaLayer
    from .distributed import fsdp_auto_wrap_policy, fully_shard_model
    from .layer import AdapterLayer, BufferDict
    from .layer import AdapterLayer as BaseTunerLayer
    from .mapping import get_peft_config, get_peft_model, inject_adapter_in_model
    from .mixed import PeftMixedModel
    from .peft_model import (
        PeftModel,
        PeftModelForCausalLM,
        PeftModelForFeatureExtraction,
        PeftModelForQuestionAnswering,
        PeftModelForSeq2SeqLM,
        PeftModelForSequenceClassification,
        PeftModelForTokenClassification,
    )
    from .state_dict import (
        get_base_model_state_dict,
        get_peft_model_state_dict,
        load_peft_weights,
        set_base_model_state_dict,
        set_peft_model_state_dict,
    )
    from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
    from .training import cast_mixed_precision_params, prepare_model_for_kbit_training
    from .tuner import BaseTuner

__all__ = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "PeftType",
    "AdapterLayer", "BaseTuner", "BaseTunerLayer", "BufferDict", "LowRankDeltaConfig", "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftMixedModel", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "MergeNotSupportedError", "NoMatchingPeftModuleError", "PeftType", "PeftWarning", "PromptLearningConfig",
    "StateDictMismatchError", "TaskType", "UnsupportedFeatureError", "UnsupportedOptionError",
    "TunerConfig", "TunerLayerStatus", "TunerModelStatus",
    "fsdp_auto_wrap_policy", "fully_shard_model", "get_layer_status",
    "get_base_model_state_dict", "get_model_status", "get_peft_config", "get_peft_model",
    "get_peft_model_state_dict", "hookimpl", "set_base_model_state_dict",
    "cast_mixed_precision_params", "prepare_model_for_kbit_training",
    "inject_adapter_in_model", "load_peft_weights", "register_layer_mapping", "register_peft_method",
    "set_peft_model_state_dict", "unregister_layer_mapping", "WeightDeltaLayer",
]

#: public name -> defining submodule (":Name" when it differs), imported on first access (needs torch)
_LAZY = {
    **{name: ".auto" for name in (
        "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
        "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
        "AutoPeftModelForTokenClassification")},
    "ModulesToSaveWrapper": ".auxiliary",
    "WeightDeltaLayer": ".delta",
    "fsdp_auto_wrap_policy": ".distributed",
    "fully_shard_model": ".distributed",
    "AdapterLayer": ".layer",
    "BaseTunerLayer": ".layer:AdapterLayer",  # HF PEFT's name
    "BufferDict": ".layer",
    "get_peft_config": ".mapping",
    "get_peft_model": ".mapping",
    "inject_adapter_in_model": ".mapping",
    "PeftMixedModel": ".mixed",
    "PeftModel": ".peft_model",
    "PeftModelForCausalLM": ".peft_model",
    "PeftModelForFeatureExtraction": ".peft_model",
    "PeftModelForQuestionAnswering": ".peft_model",
    "PeftModelForSeq2SeqLM": ".peft_model",
    "PeftModelForSequenceClassification": ".peft_model",
    "PeftModelForTokenClassification": ".peft_model",
    "get_base_model_state_dict": ".state_dict",
    "get_peft_model_state_dict": ".state_dict",
    "load_peft_weights": ".state_dict",
    "set_base_model_state_dict": ".state_dict",
    "set_peft_model_state_dict": ".state_dict",
    "TunerLayerStatus": ".status",
    "TunerModelStatus": ".status",
    "get_layer_status": ".status",
    "get_model_status": ".status",
    "cast_mixed_precision_params": ".training",
    "prepare_model_for_kbit_training": ".training",
    "BaseTuner": ".tuner",
}

#: submodules reachable as attributes (``peft_kernel.layer``) without importing them first
_SUBMODULES = (
    "auto", "auxiliary", "builtin_plugin", "cli", "combine", "config", "data", "delta", "dispatch", "distributed",
    "errors", "hookspecs", "hub", "io", "layer", "lazy", "mapping", "mixed", "peft_model", "plugins", "prompt_learning",
    "quant", "state_dict", "status", "targeting", "testing", "training", "tuner",
)

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, submodules=_SUBMODULES)
