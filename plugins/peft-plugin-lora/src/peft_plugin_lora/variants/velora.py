"""VeLoRA, memory-efficient training by rank-1 sub-token projection (``velora_config``).

The forward is plain LoRA. What changes is what A's backward keeps: instead of the input x
(tokens × in), each token is cut into ``num_groups`` sub-tokens of ``⌈in / num_groups⌉``
features (zero-padded) and each sub-token is kept as one number, its projection on a unit
vector v (``lora_velora_embed``): c = ⟨x_g, v⟩. Backward rebuilds x̃_g = scale · c · v and
gives A the gradient gᵀ x̃ (g: the gradient at A's output); the gradient to x stays exact.
So A's gradient is exact for inputs whose sub-tokens are multiples of v, an approximation
otherwise. v is the normalised mean sub-token of each training batch (``batch_average``),
of the first one (``batch_average_once``), or random (``random``). Outside training (or
without gradients) nothing is compressed. The merged weight is plain LoRA's.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from peft_kernel import BufferDict
from peft_kernel.layer import base_layer_dtype

from . import LoraVariant


def _group_size(features: int, groups: int) -> int:
    return -(-features // groups)


def sub_tokens(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (…, in) as (tokens, groups, ⌈in / groups⌉), zero-padded at the end."""
    size = _group_size(x.shape[-1], groups)
    x = F.pad(x, (0, groups * size - x.shape[-1]))
    return x.reshape(-1, groups, size)


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ‖v‖`` in float32 (a zero vector becomes the normalised all-ones vector)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v, norm = torch.ones_like(v), torch.linalg.vector_norm(torch.ones_like(v))
    return v / norm


class _CompressedInputLinear(torch.autograd.Function):
    """``F.linear(x, weight)`` whose weight gradient uses the sub-token projections of x."""

    @staticmethod
    def forward(ctx, x, weight, v, groups: int, scale: float):
        ctx.shape, ctx.dtype, ctx.groups, ctx.scale = x.shape, x.dtype, groups, scale
        ctx.save_for_backward(sub_tokens(x, groups) @ v.to(x.dtype), weight, v)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        projections, weight, v = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).reshape(ctx.shape).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            rebuilt = (projections.to(grad.dtype)[:, :, None] * v.to(grad.dtype)).flatten(1)[:, : ctx.shape[-1]]
            grad_weight = (grad.T @ (rebuilt * ctx.scale)).to(weight.dtype)
        return grad_x, grad_weight, None, None, None


class Velora(LoraVariant):
    field = "velora_config"
    title = "VeLoRA"
    containers = {"lora_velora_embed": (partial(BufferDict, persistent=True), False),
                  "velora": (dict, False),  # the adapter's VeloraConfig
                  "velora_fixed": (dict, False)}  # whether v is final (after one batch for "batch_average_once")

    def init(self, layer, adapter_name: str, config, **kwargs: Any) -> None:
        settings = config.velora_config
        A = layer.lora_A[adapter_name].weight
        dtype = base_layer_dtype(layer) or A.dtype
        size = _group_size(layer.in_features, settings.num_groups)
        if A.device.type == "meta":
            v = torch.empty(size, device="meta", dtype=dtype)
        elif settings.init_type == "random":
            v = unit(torch.randn(size, device=A.device, dtype=dtype)).to(dtype)
        else:
            v = torch.zeros(size, device=A.device, dtype=dtype)  # set by the first training batch
        layer.lora_velora_embed[adapter_name] = v
        layer.velora[adapter_name] = settings
        layer.velora_fixed[adapter_name] = settings.init_type == "random"

    def forward(self, layer, x, result, adapter_name):
        if not (layer.training and torch.is_grad_enabled()):
            return super().forward(layer, x, result, adapter_name)
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        settings = layer.velora[adapter_name]
        x = layer.lora_dropout[adapter_name](layer._cast(x, A.weight))
        if not layer.velora_fixed[adapter_name]:
            with torch.no_grad():
                v = layer.lora_velora_embed[adapter_name]
                layer.lora_velora_embed[adapter_name] = unit(sub_tokens(x.detach(), settings.num_groups).mean(
                    dim=(0, 1))).to(device=v.device, dtype=v.dtype)
            layer.velora_fixed[adapter_name] = settings.init_type == "batch_average_once"
        after_A = _CompressedInputLinear.apply(x, A.weight, layer.lora_velora_embed[adapter_name],
                                               settings.num_groups, settings.scale)
        return result + (B(after_A) * layer.scaling[adapter_name]).to(result.dtype)

