"""GPTQ quantized linear layers as a peft-kernel quantization backend (forward only).

Recognised layers:

* GPTQModel: every ``gptqmodel.nn_modules.qlinear.BaseQuantLinear`` subclass (``TorchLinear``,
  ``MarlinLinear``, ``ExllamaV2Linear``, ...). The GPTQ-packed ones
  (``PackableQuantLinear``: ``qweight``/``qzeros``/``scales``/``g_idx``) can also be
  dequantized, which methods that read the base weight (DoRA, PiSSA-style inits) need.
* AutoGPTQ (legacy): classes named ``QuantLinear`` defined under ``auto_gptq.nn_modules``,
  recognised by module and class name only; they are forward only and cannot be
  dequantized here.

Merging is refused: GPTQ weights come from a calibration pass (Hessian-based rounding) that
cannot be repeated from the merged weight alone, and re-packing them by plain rounding would
silently change the model. Save the adapter separately instead.

The quantization library is never imported here; ``matches`` only looks at modules that are
already in ``sys.modules`` (importing gptqmodel takes tens of seconds and changes process
environment variables).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.quant import QuantBackend, library_installed

if TYPE_CHECKING:  # torch is imported where it is used: registering the backend needs none
    import torch
    from torch import nn

__all__ = ["GptqBackend", "peft_kernel_register_quant_backends"]

TESTED_VERSION = "7.6.0"
_INSTALL_HINT = f"pip install 'peft-plugin-gptq[backend]' (gptqmodel=={TESTED_VERSION})"
_QLINEAR_MODULE = "gptqmodel.nn_modules.qlinear"


def _gptqmodel_class(name: str):
    mod = sys.modules.get(_QLINEAR_MODULE)
    return None if mod is None else getattr(mod, name, None)


def _is_auto_gptq_layer(module: nn.Module) -> bool:
    if "auto_gptq" not in sys.modules:
        return False
    cls = type(module)
    return cls.__name__ == "QuantLinear" and cls.__module__.startswith("auto_gptq.nn_modules")


class GptqBackend(QuantBackend):
    """GPTQModel ``BaseQuantLinear`` layers and AutoGPTQ ``QuantLinear`` layers."""

    name = "gptq"

    def available(self) -> tuple[bool, str]:
        if _QLINEAR_MODULE in sys.modules:
            return True, ""
        if not library_installed("gptqmodel", "auto_gptq"):
            return False, f"gptqmodel is not installed: {_INSTALL_HINT}"
        return True, ""

    def matches(self, module: nn.Module) -> bool:
        base = _gptqmodel_class("BaseQuantLinear")
        if base is not None and isinstance(module, base):
            return True
        return _is_auto_gptq_layer(module)

    def layer_shape(self, module: nn.Module) -> tuple[int, int]:
        return int(module.in_features), int(module.out_features)

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        import torch

        packable = _gptqmodel_class("PackableQuantLinear")
        if packable is None or not isinstance(module, packable):
            raise NotImplementedError(
                f"{type(module).__module__}.{type(module).__name__} cannot be dequantized by the gptq "
                "backend (only GPTQModel's GPTQ-packed layers such as TorchLinear can); the layer still "
                "works for forward and training"
            )
        with torch.no_grad():
            weight = module.dequantize_weight()  # (in_features, out_features)
        return weight[: module.in_features, : module.out_features].T

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        import torch

        # GPTQ layers keep scales (and bias) in the half-precision dtype they run in;
        # the output follows the input's dtype.
        scales = getattr(module, "scales", None)
        if isinstance(scales, torch.Tensor) and scales.dtype.is_floating_point:
            return scales.dtype
        return torch.float16

    def merge_blocker(self, module: nn.Module) -> str | None:
        return (
            f"GPTQ layers ({type(module).__name__}) are forward only: their weights come from a "
            "calibrated quantization that cannot be redone after a merge. Save the adapter "
            "separately (save_pretrained) instead of merging"
        )


@hookimpl
def peft_kernel_register_quant_backends(register):
    register(GptqBackend())
