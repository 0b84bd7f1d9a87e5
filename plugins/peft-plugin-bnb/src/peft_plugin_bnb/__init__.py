"""bitsandbytes quantized linear layers as peft-kernel quantization backends.

Two backends are registered:

``bnb-8bit``
    ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8()). The weight is stored as int8 rows
    ``CB`` with one absmax scale per output row ``SCB``; dequantizing is
    ``CB * SCB / 127``. Merging requantizes row-wise and keeps ``has_fp16_weights``,
    ``threshold`` and ``index`` (they live on the module and are left untouched).

``bnb-4bit``
    ``bitsandbytes.nn.Linear4bit`` (and its ``LinearNF4`` / ``LinearFP4`` subclasses).
    ``quantize_4bit`` cuts the flattened weight into blocks of ``blocksize`` values, so a block
    may span rows; the backend dequantizes in that same flat order (see
    :func:`_dequantize_4bit`). Merging requantizes with the layer's own ``quant_type``,
    ``blocksize``, ``compress_statistics`` (double quantization), ``quant_storage`` and
    original dtype.

bitsandbytes is imported only by the methods that need it. ``matches`` looks the classes
up in ``sys.modules``: when bitsandbytes was never imported, no model can hold its layers.
"""

from __future__ import annotations

import copy
import sys
from typing import TYPE_CHECKING

from peft_kernel import hookimpl
from peft_kernel.quant import QuantBackend, library_installed

if TYPE_CHECKING:  # torch is imported where it is used: registering the backend needs none
    import torch
    from torch import nn


__all__ = ["Bnb8bitBackend", "Bnb4bitBackend", "peft_kernel_register_quant_backends"]

TESTED_VERSION = "0.50.2"
_INSTALL_HINT = f"pip install 'peft-plugin-bnb[backend]' (bitsandbytes=={TESTED_VERSION})"


def _bnb_class(name: str):
    """The class ``bitsandbytes.nn.<name>`` if bitsandbytes is already imported, else None."""
    mod = sys.modules.get("bitsandbytes.nn")
    if mod is None:
        return None
    return getattr(mod, name, None)


def _available() -> tuple[bool, str]:
    if not library_installed("bitsandbytes"):
        return False, f"bitsandbytes is not installed: {_INSTALL_HINT}"
    return True, ""


class _BnbBackend(QuantBackend):
    _class_name = ""

    def available(self) -> tuple[bool, str]:
        return _available()

    def matches(self, module: nn.Module) -> bool:
        cls = _bnb_class(self._class_name)
        return cls is not None and isinstance(module, cls)

    def merge_blocker(self, module: nn.Module) -> str | None:
        if module.weight.device.type == "meta":
            return f"{type(module).__name__} has its weight on the meta device; load real weights before merging"
        return None


# -- 8-bit -------------------------------------------------------------------------------


class Bnb8bitBackend(_BnbBackend):
    """``bitsandbytes.nn.Linear8bitLt``."""

    name = "bnb-8bit"
    _class_name = "Linear8bitLt"

    @staticmethod
    def _holds_int8(module: nn.Module) -> bool:
        import torch

        return module.weight.dtype == torch.int8

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        import torch

        weight = module.weight
        if not self._holds_int8(module):
            # has_fp16_weights=True, or not quantized yet: the parameter is the weight
            return weight.detach()
        # After the first forward the scales move from the parameter to module.state.
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        if scb is None:
            raise RuntimeError(f"{type(module).__name__} holds int8 data but no row scales (SCB)")
        cb = weight.data
        return cb.to(torch.float32) * (scb.to(device=cb.device, dtype=torch.float32).unsqueeze(1) / 127.0)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        import torch

        # The int8 matmul returns the input's dtype. bitsandbytes quantizes activations
        # from float16, which is what LLM.int8() models are run in; a float bias or an
        # fp16-weights layer tells the real dtype.
        if not self._holds_int8(module):
            return module.weight.dtype
        if module.bias is not None and module.bias.dtype.is_floating_point:
            return module.bias.dtype
        return torch.float16

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb
        import torch

        old = module.weight
        device = old.device
        weight = weight.detach()
        with torch.no_grad():
            if not self._holds_int8(module):
                old.data = weight.to(device=device, dtype=old.dtype)
                module.state.reset_grads()
                return
            # Int8Params quantizes (row-wise absmax, from float16) when moved off the CPU
            # *from* the CPU, so stage the float weight there; the quantization itself runs
            # on the layer's own device.
            new = bnb.nn.Int8Params(
                weight.to(device="cpu", dtype=torch.float16),
                requires_grad=False,
                has_fp16_weights=False,
            ).to(device)
        module.weight = new
        # cached int8 copies of the old weight live in the matmul state
        module.state.reset_grads()


# -- 4-bit -------------------------------------------------------------------------------


def _quant_state(module: nn.Module):
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        state = getattr(module, "quant_state", None)
    return state


def _dequantize_4bit(data: torch.Tensor, state) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit``, reading each block where ``quantize_4bit`` put it.

    ``quantize_4bit`` cuts the flattened weight into blocks. bitsandbytes 0.50's AVX-512 CPU kernel
    instead looks the scales up per row, as if every row held ``in_features / blocksize`` whole
    blocks: when ``in_features`` is no multiple of ``blocksize`` (128 inputs, blocksize 256) it
    scales values with another block's absmax. Its other CPU paths and CUDA follow the flat order.
    A view whose rows are exactly one block (one row when the last block is partial) reads the
    flat order on every path, and gives the same values as the layer's own shape where that works.
    """
    import bitsandbytes.functional as F
    import torch

    shape = state.shape
    numel = shape.numel()
    rows = numel // state.blocksize if numel % state.blocksize == 0 else 1
    flat = copy.copy(state)  # shares the tensors; only the shape differs
    flat.shape = torch.Size([rows, numel // rows])
    return F.dequantize_4bit(data, flat).reshape(shape)


class Bnb4bitBackend(_BnbBackend):
    """``bitsandbytes.nn.Linear4bit`` (NF4 and FP4, with or without double quantization)."""

    name = "bnb-4bit"
    _class_name = "Linear4bit"

    @staticmethod
    def _is_quantized(module: nn.Module) -> bool:
        return bool(getattr(module.weight, "bnb_quantized", False)) and _quant_state(module) is not None

    def get_weight(self, module: nn.Module) -> torch.Tensor:
        if not self._is_quantized(module):
            return module.weight.detach()
        data = module.weight.data
        state = _quant_state(module)
        if getattr(state, "packing_format_for_cpu", False):
            data, state = self._unpack_cpu_format(data, state)
        return _dequantize_4bit(data, state)

    @staticmethod
    def _unpack_cpu_format(data: torch.Tensor, state):
        """Undo bitsandbytes' AVX512-BF16 inference repacking on copies (the layer keeps its
        packed weight). The absmax the layer computes with is kept as is (bf16, flat) rather
        than being re-quantized, so the result is the weight the layer really uses.

        bitsandbytes 0.50 has no public way to read a repacked weight (``dequantize_4bit``
        takes it for the canonical layout, and ``Linear4bit.state_dict()`` undoes the
        repacking in place), so this calls its private inverse, the one its own ``.cuda()``
        uses."""
        import bitsandbytes.functional as F
        import torch

        inverse = getattr(F, "_convert_weight_packed_for_cpu_inverse", None)
        if inverse is None:
            raise RuntimeError(
                "this Linear4bit holds bitsandbytes' CPU inference layout, which this bitsandbytes version "
                f"gives no way to read back; install bitsandbytes=={TESTED_VERSION}, or merge before "
                "running the model in eval mode"
            )
        state = copy.deepcopy(state)
        absmax = state.absmax  # (in / blocksize, out), bf16
        state.original_nested = False  # stop the inverse from re-quantizing absmax
        data, state = inverse(data.clone(), state)
        state.absmax = absmax.T.reshape(-1).to(torch.float32).contiguous()
        state.nested = False
        state.state2 = None
        state.offset = None
        return data, state

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        dtype = getattr(module, "compute_dtype", None)
        if dtype is not None:
            return dtype
        state = _quant_state(module)
        if state is not None:
            return getattr(state, "original_dtype", None) or state.dtype
        return module.weight.dtype

    def set_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb
        import torch

        old = module.weight
        if not self._is_quantized(module):
            with torch.no_grad():
                old.data = weight.detach().to(device=old.device, dtype=old.dtype)
            return
        state = _quant_state(module)
        packed = getattr(state, "packing_format_for_cpu", False)
        # The dtype the weight had before quantization: dequantize_4bit returns it.
        dtype = state.original_dtype if packed else state.dtype
        nested = state.original_nested if packed else state.nested
        storage = getattr(old, "quant_storage", None) or getattr(module, "quant_storage", torch.uint8)
        device = old.device
        with torch.no_grad():
            new = bnb.nn.Params4bit(
                weight.detach().to(device=device, dtype=dtype).contiguous(),
                requires_grad=False,
                blocksize=state.blocksize,
                compress_statistics=bool(nested),
                quant_type=state.quant_type,
                quant_storage=storage,
                module=module,
            )
            new = new.to(device)  # quantizes; also sets module.quant_state
        module.weight = new


@hookimpl
def peft_kernel_register_quant_backends(register):
    register(Bnb8bitBackend())
    register(Bnb4bitBackend())
