"""optimum-quanto quantized linear layers (``optimum.quanto.QLinear``) as a peft-kernel
quantization backend.

A ``QLinear`` is an ``nn.Linear`` subclass in one of two states:

* **not frozen** (after ``quantize(model, weights=...)``): ``weight`` is still the float
  parameter and the forward quantizes it on the fly. The backend reads and writes that float
  parameter directly, so merging and unmerging are exact on the stored weight.
* **frozen** (after ``freeze(model)``): ``weight`` is a quanto ``QTensor``
  (``WeightQBytesTensor`` for 8-bit types, ``WeightQBitsTensor`` for qint4/qint2). The
  backend dequantizes it, and requantizes a new weight through the layer's own
  ``freeze()`` — the very code path that produced the original — so the weight qtype, the
  group size and the scale optimizer the layer was built with are kept.

Layers that also quantize activations (``activations=qint8`` / ``qfloat8``) forward
normally but cannot be merged into: their input/output scales were calibrated for the
original weight.

optimum-quanto is imported only by the methods that need it; ``matches`` looks the class
up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.quant import QuantBackend, library_installed

if TYPE_CHECKING:  # torch is imported where it is used: registering the backend needs none
    import torch
    from torch import nn


__all__ = ["QuantoBackend", "peft_kernel_register_quant_backends"]

TESTED_VERSION = "0.2.7"
_INSTALL_HINT = f"pip install 'peft-plugin-quanto[backend]' (optimum-quanto=={TESTED_VERSION})"


def _quanto_class(module_name: str, name: str):
    mod = sys.modules.get(module_name)
    return None if mod is None else getattr(mod, name, None)


class QuantoBackend(QuantBackend):
    """``optimum.quanto.QLinear``, frozen or not."""

    name = "quanto"

    def available(self) -> tuple[bool, str]:
        if not library_installed("optimum.quanto"):
            return False, f"optimum-quanto is not installed: {_INSTALL_HINT}"
        return True, ""

    def matches(self, module: nn.Module) -> bool:
        cls = _quanto_class("optimum.quanto.nn.qlinear", "QLinear")
        return cls is not None and isinstance(module, cls)

    @staticmethod
    def _frozen(module: nn.Module) -> bool:
        qtensor = _quanto_class("optimum.quanto.tensor", "QTensor")
        return qtensor is not None and isinstance(module.weight, qtensor)

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        if self._frozen(module):
            return module.weight.dequantize()
        return module.weight.detach()

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype  # QTensors report the float dtype they stand for

    def merge_blocker(self, module: nn.Module) -> str | None:
        act = getattr(module, "activation_qtype", None)
        if act is not None:
            return (
                f"this quanto QLinear also quantizes its activations ({act.name}) with scales "
                "calibrated for the original weight; merging would invalidate them (forward only): "
                "save the adapter separately instead of merging"
            )
        if module.weight.device.type == "meta":
            return "this quanto QLinear has its weight on the meta device; load real weights before merging"
        return None

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import torch
        from torch import nn

        reason = self.merge_blocker(module)
        if reason:
            raise ValueError(reason)
        old = module.weight
        weight = weight.detach().to(device=old.device, dtype=old.dtype)
        if not self._frozen(module):
            with torch.no_grad():
                old.data = weight
            return
        requires_grad = old.requires_grad
        module.weight = nn.Parameter(weight, requires_grad=False)
        try:
            with torch.no_grad():
                module.freeze()  # quantizes with the module's qtype, group size and optimizer
        except BaseException:
            module.weight = old
            raise
        module.weight.requires_grad_(requires_grad)


@hookimpl
def peft_kernel_register_quant_backends(register):
    register(QuantoBackend())
