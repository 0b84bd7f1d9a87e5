"""torchao-quantized linear layers as a peft-kernel quantization backend.

torchao does not replace the layer: ``quantize_`` swaps the ``weight`` parameter of a
plain ``nn.Linear`` for a tensor subclass (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``,
``Float8Tensor``, ``Int4Tensor``, ...). The layer's class therefore says nothing; this
backend recognises the layer by the type of its weight.

Forward and dequantization work for every torchao weight type that implements
``dequantize()``. Merging (requantization) is offered only where the quantization settings
can be read back from the tensor and reproduced exactly:

* ``Int8WeightOnlyConfig`` -> ``Int8Tensor`` without activation quantization
  (per-row, per-tensor or per-group symmetric int8);
* ``IntxWeightOnlyConfig`` -> ``IntxUnpackedToInt8Tensor`` without activation quantization
  (int1..int8, per-axis or per-group, symmetric or asymmetric).

The new weight is quantized by ``quantize_`` with a config rebuilt from the old tensor's
attributes, and the result is checked to have the same layout before it replaces the old
weight. Weights used with dynamic activation quantization
(``Int8DynamicActivationInt8WeightConfig`` and friends) are forward only.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.quant import QuantBackend, library_installed

if TYPE_CHECKING:  # torch is imported where it is used: registering the backend needs none
    import torch
    from torch import nn


__all__ = ["TorchaoBackend", "peft_kernel_register_quant_backends"]

TESTED_VERSION = "0.18.0"
_INSTALL_HINT = f"pip install 'peft-plugin-torchao[backend]' (torchao=={TESTED_VERSION})"
_SAVE_HINT = "save the adapter separately (save_pretrained) instead of merging"


def _torchao_class(module_name: str, name: str):
    mod = sys.modules.get(module_name)
    return None if mod is None else getattr(mod, name, None)


def _is_torchao_tensor(t) -> bool:
    import torch
    from torch import nn

    if t is None or type(t) in (torch.Tensor, nn.Parameter):
        return False
    base = _torchao_class("torchao.utils", "TorchAOBaseTensor")
    if base is not None and isinstance(t, base):
        return True
    # tensor subclasses that predate / live outside TorchAOBaseTensor (e.g. NF4Tensor)
    return isinstance(t, torch.Tensor) and type(t).__module__.split(".")[0] == "torchao"


class TorchaoBackend(QuantBackend):
    """``nn.Linear`` whose weight is a torchao quantized tensor subclass."""

    name = "torchao"

    def available(self) -> tuple[bool, str]:
        if not library_installed("torchao"):
            return False, f"torchao is not installed: {_INSTALL_HINT}"
        return True, ""

    def matches(self, module: nn.Module) -> bool:
        from torch import nn

        if "torchao" not in sys.modules or not isinstance(module, nn.Linear):
            return False
        return _is_torchao_tensor(getattr(module, "weight", None))

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        weight = module.weight
        dequantize = getattr(weight, "dequantize", None)
        if dequantize is None:
            raise TypeError(f"torchao weight type {type(weight).__name__} cannot be dequantized")
        return dequantize()

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        # torchao subclasses report the high-precision dtype they stand for
        return module.weight.dtype

    # -- merge ---------------------------------------------------------------------------

    def _requant_plan(self, weight) -> tuple[object | None, str | None]:
        """``(config, None)`` when ``weight`` can be requantized by ``quantize_(config)``,
        else ``(None, reason)``."""
        kind = type(weight).__name__
        int8_cls = _torchao_class("torchao.quantization", "Int8Tensor")
        intx_cls = _torchao_class("torchao.quantization", "IntxUnpackedToInt8Tensor")
        if int8_cls is not None and isinstance(weight, int8_cls):
            return self._int8_plan(weight)
        if intx_cls is not None and isinstance(weight, intx_cls):
            return self._intx_plan(weight)
        return None, (
            f"torchao {kind} weights work for forward, but peft-kernel can only requantize "
            f"weights made by Int8WeightOnlyConfig or IntxWeightOnlyConfig; {_SAVE_HINT}"
        )

    @staticmethod
    def _int8_plan(weight):
        from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow, PerTensor

        dynamic = any(
            getattr(weight, attr, None) is not None
            for attr in ("act_quant_kwargs", "act_quant_scale", "act_quant_zero_point", "act_pre_scale")
        )
        if dynamic:
            return None, (
                "this torchao Int8Tensor weight is used with int8 activation quantization "
                "(Int8DynamicActivationInt8WeightConfig): forward only, merging into "
                f"activation-quantized layers is not supported; {_SAVE_HINT}"
            )
        if getattr(weight, "reduce_range", False):
            return None, f"torchao Int8Tensor with reduce_range=True cannot be requantized; {_SAVE_HINT}"
        zp = weight.zero_point
        if zp is not None and bool((zp != 0).any()):
            return None, f"asymmetric torchao Int8Tensor weights cannot be requantized; {_SAVE_HINT}"
        block = tuple(weight.block_size)
        out_f, in_f = weight.shape
        if len(block) != 2:
            return None, f"torchao Int8Tensor with block_size {block} is not a linear weight; {_SAVE_HINT}"
        if block == (1, in_f):
            granularity = PerRow()
        elif block == (out_f, in_f):
            granularity = PerTensor()
        elif block[0] == 1 and in_f % block[1] == 0:
            granularity = PerGroup(block[1])
        else:
            return None, f"torchao Int8Tensor block_size {block} has no matching config; {_SAVE_HINT}"
        return Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False), None

    @staticmethod
    def _intx_plan(weight):
        import torch
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerAxis, PerGroup

        if getattr(weight, "activation_quantization", None) is not None:
            return None, (
                "this torchao IntxUnpackedToInt8Tensor weight is used with dynamic activation "
                f"quantization ({weight.activation_quantization}): forward only; {_SAVE_HINT}"
            )
        zp = weight.zero_point
        if zp.dtype != torch.int8:
            return None, (
                f"torchao IntxUnpackedToInt8Tensor with a {zp.dtype} zero point was not made by "
                f"IntxWeightOnlyConfig and cannot be requantized; {_SAVE_HINT}"
            )
        block = tuple(weight.block_size)
        in_f = weight.shape[-1]
        if len(block) != 2 or block[0] != 1:
            return None, f"torchao IntxUnpackedToInt8Tensor block_size {block} is not row-grouped; {_SAVE_HINT}"
        granularity = PerAxis(0) if block[1] == in_f else PerGroup(block[1])
        mapping = MappingType.ASYMMETRIC if bool((zp != 0).any()) else MappingType.SYMMETRIC
        scale_dtype = weight.scale.dtype if weight.scale.dtype != weight.dtype else None
        return (
            IntxWeightOnlyConfig(
                weight_dtype=weight.target_dtype,
                granularity=granularity,
                mapping_type=mapping,
                scale_dtype=scale_dtype,
            ),
            None,
        )

    def merge_blocker(self, module: nn.Module) -> str | None:
        return self._requant_plan(module.weight)[1]

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torch import nn
        from torchao.quantization import quantize_

        old = module.weight
        config, reason = self._requant_plan(old)
        if config is None:
            raise ValueError(reason)
        out_f, in_f = old.shape
        holder = nn.Linear(in_f, out_f, bias=False, device="meta")
        holder.weight = nn.Parameter(
            weight.detach().to(device=old.device, dtype=old.dtype).contiguous(), requires_grad=False
        )
        quantize_(holder, config)
        new = holder.weight
        problem = _layout_difference(old, new)
        if problem:
            raise RuntimeError(f"requantizing the torchao weight changed its layout ({problem}); weight left unchanged")
        module.weight = new


def _layout_difference(old, new) -> str | None:
    if type(new) is not type(old):
        return f"{type(old).__name__} -> {type(new).__name__}"
    if new.dtype != old.dtype or new.shape != old.shape or new.device != old.device:
        return f"{old.dtype}/{tuple(old.shape)}/{old.device} -> {new.dtype}/{tuple(new.shape)}/{new.device}"
    if tuple(new.block_size) != tuple(old.block_size):
        return f"block_size {tuple(old.block_size)} -> {tuple(new.block_size)}"
    for attr in ("target_dtype", "activation_quantization", "act_quant_kwargs", "reduce_range"):
        if getattr(new, attr, None) != getattr(old, attr, None):
            return f"{attr} {getattr(old, attr, None)} -> {getattr(new, attr, None)}"
    for attr in ("qdata", "scale", "zero_point"):
        a, b = getattr(old, attr, None), getattr(new, attr, None)
        if (a is None) != (b is None) or (a is not None and (a.dtype != b.dtype or a.shape != b.shape)):
            return f"{attr} layout"
    return None


@hookimpl
def peft_kernel_register_quant_backends(register):
    register(TorchaoBackend())
