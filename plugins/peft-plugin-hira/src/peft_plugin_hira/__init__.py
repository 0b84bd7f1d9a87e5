"""HiRA for peft-kernel: ``HiraConfig``, ``HiraModel`` and ``HiraLayer``.

Found through the ``peft_kernel`` entry point ``hira``; importing this module registers
nothing by itself. It does not import torch: the config is torch-free, the tuner is
registered as a lazy string and the layer is imported when a model is adapted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.lazy import lazy_attributes

from .config import HiraConfig

if TYPE_CHECKING:
    from .layer import HiraLayer
    from .model import HiraModel

__all__ = ["HiraConfig", "HiraLayer", "HiraModel"]

__getattr__, __dir__ = lazy_attributes(__name__, {"HiraModel": ".model", "HiraLayer": ".layer"})


@hookimpl
def peft_kernel_register_methods(register):
    register(name="hira", config_cls=HiraConfig, model_cls="peft_plugin_hira.model:HiraModel", prefix="hira_")

