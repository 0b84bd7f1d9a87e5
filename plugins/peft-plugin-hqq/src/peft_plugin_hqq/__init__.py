"""HQQ quantized linear layers (``hqq.core.quantize.HQQLinear``) as a peft-kernel
quantization backend.

``HQQLinear`` is not an ``nn.Linear``: it keeps the packed weight in ``W_q`` and the
per-group scale/zero (and the bit width, group size and axis) in ``meta``. It also keeps
the configuration it was quantized with in ``quant_config``, so requantizing after a merge
simply runs the layer's own ``quantize`` again with that configuration, in place, on the
layer's device. The bias is not quantized and stays as it is.

hqq is imported only by the methods that need it; ``matches`` looks the class up in
``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.quant import QuantBackend, library_installed

if TYPE_CHECKING:  # torch is imported where it is used: registering the backend needs none
    import torch
    from torch import nn


__all__ = ["HqqBackend", "peft_kernel_register_quant_backends"]

TESTED_VERSION = "0.2.8"
_INSTALL_HINT = f"pip install 'peft-plugin-hqq[backend]' (hqq=={TESTED_VERSION})"


def _hqq_linear_class():
    mod = sys.modules.get("hqq.core.quantize")
    return None if mod is None else getattr(mod, "HQQLinear", None)


class HqqBackend(QuantBackend):
    """``hqq.core.quantize.HQQLinear`` (and subclasses)."""

    name = "hqq"

    def available(self) -> tuple[bool, str]:
        if not library_installed("hqq"):
            return False, f"hqq is not installed: {_INSTALL_HINT}"
        return True, ""

    def matches(self, module: nn.Module) -> bool:
        cls = _hqq_linear_class()
        return cls is not None and isinstance(module, cls)

    def layer_shape(self, module: nn.Module) -> tuple[int, int]:
        meta = getattr(module, "meta", None)
        if meta is not None and "shape" in meta:
            out_features, in_features = meta["shape"]
            return int(in_features), int(out_features)
        return module.in_features, module.out_features

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        if not getattr(module, "ready", False):
            raise RuntimeError("this HQQLinear layer has not been quantized yet (no W_q/meta)")
        shape = tuple(int(s) for s in module.meta["shape"])  # (out, in)
        return module.dequantize().reshape(shape)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype

    def merge_blocker(self, module: nn.Module) -> str | None:
        if not getattr(module, "ready", False):
            return "this HQQLinear layer has not been quantized yet; nothing to merge into"
        if getattr(module, "quant_config", None) is None:
            return ("this HQQLinear layer has no quant_config to requantize with; save the adapter separately "
                    "instead of merging")
        return None

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import torch

        reason = self.merge_blocker(module)
        if reason:
            raise ValueError(reason)
        old_w_q, old_meta = module.W_q, module.meta
        weight = weight.detach().to(device=old_w_q.device, dtype=torch.float32)
        # HQQLinear.quantize assigns a plain tensor to W_q before wrapping it in a
        # Parameter, which nn.Module refuses while W_q is a registered parameter: drop the
        # registration first and put the old one back if quantization fails.
        del module.W_q
        try:
            with torch.no_grad():
                module.quantize(weight, **module.quant_config)
        except BaseException:
            module.W_q, module.meta = old_w_q, old_meta
            raise


@hookimpl
def peft_kernel_register_quant_backends(register):
    register(HqqBackend())
