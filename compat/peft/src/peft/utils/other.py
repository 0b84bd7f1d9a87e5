"""``peft.utils.other``: module helpers that transformers and diffusers import."""

from __future__ import annotations

from torch import nn

from peft_kernel import ModulesToSaveWrapper

#: HF PEFT's base of wrappers that train whole modules next to the adapter; here, modules_to_save
AuxiliaryTrainingWrapper = ModulesToSaveWrapper


def _get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """``(parent, module, attribute name)`` of the submodule named ``key``."""
    parent_name, _, target_name = key.rpartition(".")
    return model.get_submodule(parent_name), model.get_submodule(key), target_name


__all__ = ["AuxiliaryTrainingWrapper", "ModulesToSaveWrapper", "_get_submodules"]
