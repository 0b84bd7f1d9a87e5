"""``peft.functional``: adapter operations on a model that is not wrapped in a PeftModel (as
transformers' and diffusers' adapter APIs hold them)."""

from __future__ import annotations

from torch import nn

from peft_kernel import BaseTunerLayer, ModulesToSaveWrapper, inject_adapter_in_model, set_peft_model_state_dict


def delete_adapter(model: nn.Module, adapter_name: str, prefix: str | None = None,
                   layer_cls: type = BaseTunerLayer) -> list[str] | None:
    """Remove ``adapter_name`` from every adapter layer of ``model``; returns the adapters left
    active (None when the model holds no adapter layer)."""
    active = None
    for module in model.modules():
        if isinstance(module, (layer_cls, ModulesToSaveWrapper)):
            module.delete_adapter(adapter_name)
            active = module.active_adapters
    return active


__all__ = ["delete_adapter", "inject_adapter_in_model", "set_peft_model_state_dict"]
