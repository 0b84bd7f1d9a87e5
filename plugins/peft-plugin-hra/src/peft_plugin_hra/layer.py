"""The HRA layer. Per adapter, the weight is multiplied on its input side by a product of
``r`` Householder reflections::

    W ↦ W·H₁ H₂ ⋯ H_r,   Hᵢ = I - 2uᵢuᵢᵀ,  uᵢ = hra_u[:, i] / ‖hra_u[:, i]‖    hra_u: (in, r)

With ``apply_GS`` the columns are orthonormalised first (Gram-Schmidt), which makes the product
``I - 2UUᵀ``. A convolution's weight is reflected over its flattened fan-in. The default
initialisation repeats each random vector twice, so the reflections cancel in pairs and the
layer starts as the identity (within rounding; r must be even, and not with Gram-Schmidt,
whose product is never I: then the vectors start random). Linear layers (also Conv1D and
quantized ones) reflect the input (``base(x·H_r ⋯ H₁)``), so the base layer runs as it is;
convolutions use ``op(x, W·H)``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from peft_kernel import PeftWarning, WeightDeltaLayer
from peft_kernel.orthogonal import gram_schmidt, householder_matmul


class HRALayer(WeightDeltaLayer):
    adapter_layer_names = ("hra_u",)
    other_param_names = ("hra_r", "hra_apply_GS")

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        r = config.r
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        vectors = self.hra_u[adapter_name] = nn.Parameter(torch.empty(math.prod(self.delta_shape[1:]), r))
        # Gram-Schmidt makes the product I - 2UUᵀ, never I, and cannot orthonormalise equal vectors
        # (HF PEFT divides 0 by 0 there and outputs NaN): such layers start random, as for an odd r
        why_not_identity = "with apply_GS" if config.apply_GS else f"with an odd r ({r})" if r % 2 else None
        if config.init_weights and not why_not_identity:  # each vector twice: the reflections cancel in pairs
            half = torch.empty(len(vectors), r // 2, device=vectors.device)
            nn.init.kaiming_uniform_(half, a=math.sqrt(5))
            with torch.no_grad():
                vectors.copy_(half.repeat_interleave(2, dim=1))
        else:
            if config.init_weights:
                warnings.warn(f"HRA {why_not_identity} cannot start as the identity: its vectors are random",
                              PeftWarning, stacklevel=3)
            nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))
        self.hra_r[adapter_name], self.hra_apply_GS[adapter_name] = r, config.apply_GS

    def reflect(self, x: torch.Tensor, adapter_name: str, reverse: bool = False) -> torch.Tensor:
        """``x @ H₁ ⋯ H_r`` on the last dimension of ``x`` (``reverse``: ``x @ H_r ⋯ H₁``, the inverse)."""
        vectors = self.hra_u[adapter_name]
        if self.hra_apply_GS[adapter_name]:
            vectors = gram_schmidt(vectors)
        return householder_matmul(x.to(vectors.dtype), vectors, reverse=reverse)

    # -- on activations (linear layers) and on weights ------------------------------------

    @property
    def transforms_activations(self) -> bool:
        return self.base_kind == "linear"

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.reflect(x, adapter_name, reverse=True).to(x.dtype)  # x·Hᵀ, and Hᵀ = H_r ⋯ H₁

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.reflect(weight.flatten(1), adapter_name).reshape_as(weight)

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.reflect(weight.flatten(1), adapter_name, reverse=True).reshape_as(weight)

    def __repr__(self) -> str:
        return "hra." + super().__repr__()
