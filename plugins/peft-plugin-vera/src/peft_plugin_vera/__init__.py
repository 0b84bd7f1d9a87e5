"""VeRA for peft-kernel: ``VeraConfig``, ``VeraModel`` and the VeRA layer.

Found through the ``peft_kernel`` entry point ``vera``; importing this module registers
nothing by itself.

This is the entry-point module, so it does not import torch: the config is imported
eagerly (torch-free), the tuner, the layer and ``make_projections`` on first attribute
access (PEP 562), and the method is registered with a lazy ``model_cls`` string.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from peft_kernel import PeftWarning, hookimpl
from peft_kernel.dispatch import dispatch_method_layer
from peft_kernel.lazy import lazy_attributes

from .config import VeraConfig

if TYPE_CHECKING:
    from .layer import Linear, VeraLayer
    from .model import VeraModel, make_projections

__all__ = ["VeraConfig", "VeraModel", "VeraLayer", "Linear", "make_projections"]

#: public name -> defining submodule, imported on first access (they need torch)
_LAZY = {
    "VeraModel": ".model",
    "make_projections": ".model",
    "VeraLayer": ".layer",
    "Linear": ".layer",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)


PEFT_TYPE = "VERA"
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@hookimpl
def peft_kernel_register_methods(register):
    register(name="vera", config_cls=VeraConfig, model_cls="peft_plugin_vera.model:VeraModel", prefix="vera_lambda_")


@hookimpl(trylast=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    if config.peft_type != PEFT_TYPE:
        return None
    from .layer import Linear

    return dispatch_method_layer(target, target_name, adapter_name, config, Linear)


@hookimpl
def peft_kernel_adapter_state_dict(model, config, adapter_name, state_dict):
    """The shared projections are saved only with ``save_projection=True``."""
    if config.peft_type != PEFT_TYPE or config.save_projection:
        return
    for key in PROJECTION_KEYS:
        state_dict.pop(key, None)


@hookimpl
def peft_kernel_load_state_dict(model, config, adapter_name, state_dict):
    """Check the checkpoint's projections against ``save_projection``."""
    if config.peft_type != PEFT_TYPE:
        return
    present = [key for key in PROJECTION_KEYS if key in state_dict]
    if config.save_projection:
        if len(present) != len(PROJECTION_KEYS):
            missing = [key for key in PROJECTION_KEYS if key not in state_dict]
            raise ValueError(
                f"The VeRA adapter {adapter_name!r} has save_projection=True, but the checkpoint lacks {missing}. "
                "If it was saved with save_projection=False, set that in its adapter_config.json (the projections "
                "are then regenerated from projection_prng_key)."
            )
        return
    if present:
        warnings.warn(
            "The checkpoint contains vera_A / vera_B but its config says save_projection=False; they are ignored and "
            "the projections regenerated from projection_prng_key are used. Set save_projection=True to use them.",
            PeftWarning,
            stacklevel=2,
        )
        for key in present:
            state_dict.pop(key)
    else:
        warnings.warn(
            "save_projection=False: the VeRA projections were regenerated from projection_prng_key instead of being "
            "loaded. This is exact only with the same PyTorch CPU generator as when the adapter was trained.",
            PeftWarning,
            stacklevel=2,
        )
