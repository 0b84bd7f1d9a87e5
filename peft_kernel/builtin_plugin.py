"""The kernel's own hook implementations, registered like any other plugin.

Torch-free at import and at registration: this module is loaded by plugin discovery.
"""

from __future__ import annotations

from .dispatch import dispatch_user_mapping
from .plugins import hookimpl

#: the standard ``add_weighted_adapter`` strategies (name -> ``svd``), implemented in
#: :mod:`peft_kernel.combine`; must equal what ``combine.register_builtin_combinations`` registers
BUILTIN_COMBINATIONS = {
    "linear": False,
    "svd": True,
    "ties": False,
    "ties_svd": True,
    "dare_linear": False,
    "dare_linear_svd": True,
    "dare_ties": False,
    "dare_ties_svd": True,
    "magnitude_prune": False,
    "magnitude_prune_svd": True,
}


def _deferred(name: str):
    """The built-in strategy ``name``; :mod:`peft_kernel.combine` (torch) is imported on the first call."""

    def combine(tensors, weights, **kw):
        from .combine import builtin_combination

        return builtin_combination(name)(tensors, weights, **kw)

    combine.__name__ = combine.__qualname__ = name
    return combine


@hookimpl(tryfirst=True)
def peft_kernel_dispatch_layer(target, target_name, adapter_name, config):
    """User-registered layer mappings win over every plugin."""
    return dispatch_user_mapping(target, target_name, adapter_name, config)


@hookimpl
def peft_kernel_register_combinations(register):
    """The standard add_weighted_adapter strategies (tensor math shared by all methods)."""
    for name, svd in BUILTIN_COMBINATIONS.items():
        register(name, _deferred(name), svd=svd)
