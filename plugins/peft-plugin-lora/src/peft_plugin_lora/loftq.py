"""LoftQ: start the adapter from the quantization error of the base weight.

A quantized base Q loses ``W - Q``. LoftQ (Li et al., 2023, arXiv:2310.08659) alternates

    Q_t  = quantize(W - s·B_{t-1} A_{t-1})         (Q_0 = quantize(W))
    s·B_t A_t = best rank-r approximation of W - Q_t   (truncated SVD)

so that ``Q + s·BA`` is closer to ``W`` than ``Q`` alone. ``init_lora_weights="loftq"``
runs it on a full-precision base and leaves ``Q`` (dequantized) as the base weight, ready
to be saved and loaded in 4 bits; :func:`replace_lora_weights_loftq` runs the last step on a
base that is already quantized, reading the original weights from safetensors files.

The quantizers reproduce bitsandbytes' formats exactly, written from their definitions:

* ``nf4`` — NormalFloat-4 (Dettmers et al., 2023, arXiv:2305.14314): 16 levels at the
  quantiles of a standard normal, 8 for the positive half and 7 for the negative half plus
  an exact zero, normalised to [-1, 1]; each block of 64 consecutive values is scaled by
  its absolute maximum and rounded to the nearest level;
* ``fp4`` — the same block-wise scheme over bitsandbytes' 4-bit float levels;
* ``int8`` — one absolute-maximum scale per row, values rounded to integers in [-127, 127].

Unlike HF PEFT 0.21.2, the factors honour the adapter's scaling (``lora_alpha / r``): the
adapter adds ``s·BA``, so ``BA`` is the low-rank fit divided by ``s`` (HF assumes ``s = 1``;
see huggingface/peft#1982). With ``lora_alpha == r`` the two agree.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from .layer import factors_from_svd

BLOCKSIZE = 64  # bitsandbytes' default block size for 4-bit weights
QUANT_TYPES = ("nf4", "fp4", "int8")


@functools.cache
def normal_float_levels() -> torch.Tensor:
    """The 16 NormalFloat-4 levels, ascending, in [-1, 1].

    Quantiles of N(0, 1) at evenly spaced probabilities from ``δ`` to 1/2: 8 on the positive
    side, 7 on the negative side, plus 0. ``δ = 0.9677083`` (½(1/30 + 1/32) from the top, as
    published) keeps the extreme quantiles finite. Probabilities are spaced in float32, as in
    the reference construction, so the levels are bit-identical to bitsandbytes'."""
    delta = 0.9677083
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8)[:-1].double())
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return levels / levels.max()


@functools.cache
def fp4_levels() -> torch.Tensor:
    """bitsandbytes' 16 FP4 levels, ascending: sign, 2-bit exponent, 1-bit mantissa, i.e.
    magnitudes {0, 1/16, 2, 3, 4, 6, 8, 12} / 12 (the smallest subnormal is 1/16)."""
    magnitudes = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0
    return torch.cat([-magnitudes, magnitudes]).sort().values


def _round_to_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each entry of ``x`` replaced by the nearest of ``levels`` (ascending)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(x, midpoints)]


def _blockwise_4bit(weight: torch.Tensor, levels: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    dequantized = _round_to_levels(scaled, levels.to(weight.device)) * absmax
    return dequantized.reshape(-1)[: flat.numel()].reshape(weight.shape)


def _rowwise_int8(weight: torch.Tensor) -> torch.Tensor:
    absmax = weight.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    return torch.round(weight * (127.0 / safe)).clamp(-127, 127) * (safe / 127.0)


def quantize_roundtrip(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """``dequantize(quantize(weight))`` in float32 for ``quant_type`` ``"nf4"``, ``"fp4"``
    (block-wise, ``blocksize`` consecutive values per scale) or ``"int8"`` (row-wise)."""
    weight = weight.detach().float()
    if quant_type == "nf4":
        return _blockwise_4bit(weight, normal_float_levels(), blocksize)
    if quant_type == "fp4":
        return _blockwise_4bit(weight, fp4_levels(), blocksize)
    if quant_type == "int8":
        return _rowwise_int8(weight.reshape(weight.shape[0], -1)).reshape(weight.shape)
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def quant_type_for_bits(bits: int) -> str:
    """The quantizer LoftQ uses for ``loftq_bits`` (HF PEFT's choice: NF4 for 4, int8 for 8)."""
    if bits == 4:
        return "nf4"
    if bits == 8:
        return "int8"
    raise ValueError(f"loftq_bits must be 4 or 8, got {bits!r}")


def split_low_rank(matrix: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling · B @ A`` the best rank-``rank`` approximation of
    ``matrix`` (truncated SVD, singular values shared evenly between the factors)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return factors_from_svd(U[:, :rank], S[:rank], Vh[:rank], scaling)


def loftq_factors(weight: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], rank: int,
                  scaling: float, iterations: int = 1):
    """Run LoftQ's alternation on ``weight`` (out × in, float32).

    Returns ``(Q, A, B)``: the dequantized weight of the last round and the factors with
    ``Q + scaling · B @ A ≈ weight``."""
    target = weight
    for step in range(iterations):
        quantized = quantize(target)
        A, B = split_low_rank(weight - quantized, rank, scaling)
        if step + 1 < iterations:
            target = weight - scaling * B @ A
    return quantized, A, B


# -- replace_lora_weights_loftq ---------------------------------------------------------


class _SafetensorsWeights:
    """Original weights read one tensor at a time from ``model.safetensors`` or a sharded
    ``model.safetensors.index.json`` (only safetensors can be read lazily)."""

    def __init__(self, path: str) -> None:
        import json

        if os.path.isdir(path):
            single = os.path.join(path, "model.safetensors")
            index = os.path.join(path, "model.safetensors.index.json")
        else:
            single, index = path, None
        if os.path.isfile(single):
            self.files = None
            self.single = single
        elif index is not None and os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            self.files = {key: os.path.join(path, file) for key, file in weight_map.items()}
        else:
            raise FileNotFoundError(
                f"No model.safetensors or model.safetensors.index.json at {path!r}; replace_lora_weights_loftq reads "
                "the unquantized weights from safetensors files (save the base model with safe_serialization=True)."
            )

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        file = self.single if self.files is None else self.files.get(key)
        if file is None:
            return None
        with safe_open(file, framework="pt", device="cpu") as fh:
            return fh.get_tensor(key) if key in fh.keys() else None


def _model_path(peft_model) -> str:
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    config = getattr(base, "config", None)
    path = getattr(config, "_name_or_path", None) or getattr(base, "name_or_path", None)
    if path and os.path.isdir(path):
        return path
    raise ValueError(
        "replace_lora_weights_loftq needs the unquantized weights: pass model_path=<directory with model.safetensors> "
        f"(the base model's recorded path {path!r} is not a local directory)."
    )


@torch.no_grad()
def replace_lora_weights_loftq(peft_model, model_path: str | None = None, adapter_name: str = "default",
                               callback: Callable | None = None):
    """One LoftQ step on a model whose base layers are already quantized.

    For every LoRA linear layer of ``adapter_name`` on a quantized base (any backend that
    peft-kernel recognises: bitsandbytes 4- and 8-bit, HQQ, ...), A and B become the best
    rank-r fit of ``W - dequantize(base)``, ``W`` read lazily from the safetensors files at
    ``model_path`` (a directory or a ``.safetensors`` file; default: the base model's own
    directory). Only the LoRA weights change. Can be repeated.

    ``callback(model, module_name) -> bool`` runs after each layer is replaced; returning
    False restores that layer's previous factors (e.g. keep only replacements that bring the
    logits closer to the unquantized model's).
    """
    from peft_kernel import quant

    from .layer import Linear

    weights = _SafetensorsWeights(model_path or _model_path(peft_model))
    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    prefix = getattr(base_model, "base_model_prefix", "") or ""
    replaced = []
    for name, module in base_model.named_modules():
        if not isinstance(module, Linear) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        if not quant.is_quantized(base):
            continue
        original = None
        for key in (f"{name}.weight", f"{name.removeprefix(prefix + '.')}.weight" if prefix else None):
            if key is not None and original is None:
                original = weights.get(key)
        if original is None:
            raise KeyError(f"{name}.weight is not in the safetensors files at {model_path!r}; is it the same model?")
        original = original.float().to(quant.base_weight(base).device)
        if module.fan_in_fan_out:
            original = original.T
        dequantized = module._base_matrix()
        A, B = split_low_rank(original - dequantized, module.r[adapter_name], module.scaling[adapter_name])
        previous = module.lora_A[adapter_name].weight.data, module.lora_B[adapter_name].weight.data
        module._set_factors(adapter_name, A, B)
        replaced.append(name)
        if callback is not None and not callback(peft_model, name):
            module.lora_A[adapter_name].weight.data, module.lora_B[adapter_name].weight.data = previous
    if not replaced:
        raise ValueError(
            f"No LoRA layer of adapter {adapter_name!r} has a quantized base: replace_lora_weights_loftq works on a "
            "model loaded quantized (e.g. BitsAndBytesConfig(load_in_4bit=True)). For a full-precision model use "
            "init_lora_weights='loftq' instead."
        )
    return replaced
