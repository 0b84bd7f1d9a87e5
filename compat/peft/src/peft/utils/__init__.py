"""``peft.utils``: checkpoint helpers, module helpers and the type enums."""

from peft_kernel import (
    ModulesToSaveWrapper,
    PeftType,
    TaskType,
    get_peft_model_state_dict,
    load_peft_weights,
    set_peft_model_state_dict,
)

from .other import AuxiliaryTrainingWrapper, _get_submodules

__all__ = ["AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "PeftType", "TaskType", "_get_submodules",
           "get_peft_model_state_dict", "load_peft_weights", "set_peft_model_state_dict"]
