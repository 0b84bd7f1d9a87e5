"""A minimal out-of-tree peft-kernel plugin: SSF ("Scaling & Shifting your Features",
Lian et al., 2022) on linear layers.

Each adapted linear layer gets a per-output scale γ (starts at 1) and shift β (starts
at 0)::

    y = γ ⊙ (W x + b) + β

A new adapter is an identity; merging folds it into the layer exactly
(``W ← diag(γ) W``, ``b ← γ b + β``), which needs the layer to have a bias.

The whole plugin is this module, :mod:`peft_plugin_example.layer` (the layer and the
tuner) and one entry point in ``pyproject.toml``::

    [project.entry-points.peft_kernel]
    example = "peft_plugin_example"

The entry-point module (this one) does not import torch, so ``import peft_kernel`` and
plugin discovery stay fast: the config is torch-free, the method is registered with a
lazy ``model_cls`` string, and the torch parts are imported when the method is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peft_kernel import TunerConfig, hookimpl

if TYPE_CHECKING:
    from .layer import SSFLayer, SSFModel

__all__ = ["SSFConfig", "SSFLayer", "SSFModel"]


@dataclass
class SSFConfig(TunerConfig):
    """Which linear layers get a scale and shift (``target_modules`` etc. from TunerConfig)."""

    init_scale: float = field(default=1.0, metadata={"help": "Initial γ (1.0: the adapter starts as an identity)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "SSF"


def __getattr__(name: str) -> Any:
    """``SSFLayer`` and ``SSFModel`` are imported (with torch) on first access."""
    if name in ("SSFLayer", "SSFModel"):
        from . import layer

        return getattr(layer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def peft_kernel_register_methods(register):
    register(name="ssf", config_cls=SSFConfig, model_cls="peft_plugin_example.layer:SSFModel")

