"""The kernel's own hook implementations, registered like any other plugin."""

from __future__ import annotations

from .dispatch import dispatch_user_mapping
from .plugins import hookimpl


@hookimpl(tryfirst=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    """User-registered layer mappings win over every plugin."""
    return dispatch_user_mapping(target, target_name, adapter_name, config)


@hookimpl
def peft_kernel_register_combinations(register):
    """The standard add_weighted_adapter strategies (tensor math shared by all methods)."""
    from .combine import register_builtin_combinations

    register_builtin_combinations(register)
