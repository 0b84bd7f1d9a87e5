"""peft-kernel: Hugging Face PEFT's API and checkpoint format on a small plugin kernel.

Methods and quantization backends are plugins found through the
``peft_kernel`` entry-point group; see :mod:`peft_kernel.hookspecs` for the contract.
"""

from .auxiliary import ModulesToSaveWrapper
from .config import PeftConfig, PromptLearningConfig, TaskType, TunerConfig
from .dispatch import register_layer_mapping, unregister_layer_mapping
from .distributed import fsdp_auto_wrap_policy, fully_shard_model
from .errors import MergeNotSupportedError, NoMatchingPeftModuleError, PeftWarning
from .layer import AdapterLayer, BufferDict
from .mapping import get_peft_config, get_peft_model, inject_adapter_in_model
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .plugins import hookimpl, register_peft_method
from .state_dict import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .training import prepare_model_for_kbit_training
from .tuner import BaseTuner

BaseTunerLayer = AdapterLayer  # HF PEFT's name

__all__ = [
    "AdapterLayer", "BaseTuner", "BaseTunerLayer", "BufferDict", "ModulesToSaveWrapper", "PeftConfig",
    "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
    "MergeNotSupportedError", "NoMatchingPeftModuleError", "PeftWarning", "PromptLearningConfig", "TaskType", "TunerConfig", "TunerLayerStatus", "TunerModelStatus",
    "fsdp_auto_wrap_policy", "fully_shard_model", "get_layer_status",
    "get_model_status", "get_peft_config", "get_peft_model", "get_peft_model_state_dict", "hookimpl", "prepare_model_for_kbit_training",
    "inject_adapter_in_model", "load_peft_weights", "register_layer_mapping", "register_peft_method",
    "set_peft_model_state_dict", "unregister_layer_mapping",
]
