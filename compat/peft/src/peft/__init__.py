"""The ``peft`` import name, served by peft-kernel.

transformers, TRL, diffusers and accelerate find PEFT by importing ``peft``; this package answers
with peft-kernel's own objects (``peft.PeftModel is peft_kernel.PeftModel``), so a model built with
either name is recognised by both. Every method's config class is here under its own name
(``peft.LoraConfig``, ``peft.IA3Config``, and those of third-party plugins), found through the
plugin registry. Names HF PEFT has and peft-kernel does not are placeholders that refuse to be
used, with a message saying so, so that modules importing them still import.
"""

from __future__ import annotations

from importlib import metadata

from peft_kernel import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftConfig,
    PeftMixedModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    PeftType,
    PromptLearningConfig,
    TaskType,
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    prepare_model_for_kbit_training,
    register_peft_method,
    set_peft_model_state_dict,
)

from ._missing import PLACEHOLDERS, missing_name

try:
    __version__ = metadata.version("peft")
except metadata.PackageNotFoundError:  # on sys.path without being installed: libraries will not see it either
    __version__ = "0+unknown"

__all__ = [
    "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification", "PeftConfig", "PeftMixedModel", "PeftModel", "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType",
    "PromptLearningConfig", "TaskType", "get_peft_config", "get_peft_model", "get_peft_model_state_dict",
    "inject_adapter_in_model", "load_peft_weights", "prepare_model_for_kbit_training", "register_peft_method",
    "set_peft_model_state_dict",
]


def __getattr__(name: str):
    """Method config classes by their class name (``LoraConfig``, ``PrefixTuningConfig``), from
    the plugin registry; a placeholder for the few that libraries import although no installed
    plugin provides them."""
    if name.endswith("Config"):
        from peft_kernel.plugins import manager

        for spec in manager().methods().values():
            if spec.config_cls.__name__ == name:
                return spec.config_cls
    if name in PLACEHOLDERS:
        return PLACEHOLDERS[name]
    return missing_name(__name__, name)
