"""KaSA, knowledge-aware singular-value adaptation (``kasa_config``).

When the adapter is added, the base weight W = U diag(σ) Vᵀ loses its r smallest singular
components (W ← the best rank-(k − r) approximation, k = min(out, in)); the adapter then
learns in their place, with a trainable vector ``d`` (``lora_diag``, one entry per rank)
between the factors:

    h = W x + s · B diag(d) A x

B starts at zero, so the model starts as the truncated base. The truncation is permanent:
disabling, unloading or unmerging the adapter gives the truncated base, not the original.
The paper's regularisers (``kasa_loss``) keep d small and A, B near semi-orthogonal.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel import quant

from . import LoraVariant


class Kasa(LoraVariant):
    field = "kasa_config"
    title = "KaSA"
    containers = {"lora_diag": (nn.ParameterDict, True)}
    combinable = False  # d sits between the factors
    converts_to_lora = False  # the base itself was changed

    def init(self, layer, adapter_name: str, config, **kwargs: Any) -> None:
        A = layer.lora_A[adapter_name].weight
        r = layer.r[adapter_name]
        base = layer.get_base_layer()
        if quant.base_weight(base).device.type == "meta":
            raise ValueError("KaSA truncates the base weight when the adapter is added, but the base weight of "
                             f"{type(base).__name__} is on the meta device; load the base model's weights first")
        # d draws before the truncation, as in HF PEFT (so a seed gives the same d)
        draw = torch.empty if A.device.type == "meta" else torch.randn
        layer.lora_diag[adapter_name] = nn.Parameter(draw(r, device=A.device, dtype=A.dtype))
        weight = layer._base_matrix()
        k = min(weight.shape)
        if r >= k:
            raise ValueError(f"KaSA needs r < min(in_features, out_features) = {k} so that the truncated base keeps at "
                             f"least one singular component; got r={r}. Lower r (or rank_pattern) for this layer.")
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        kept = k - r
        layer._write_base_matrix((U[:, :kept] * S[:kept]) @ Vh[:kept])

    def update_factors(self, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight * layer.lora_diag[adapter_name]

    def forward(self, layer, x, result, adapter_name):
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        x = layer.lora_dropout[adapter_name](layer._cast(x, A.weight))
        out = B(A(x) * layer.lora_diag[adapter_name]) * layer.scaling[adapter_name]
        return result + out.to(result.dtype)


def kasa_loss(layer, adapter_name: str, beta: float, gamma: float) -> torch.Tensor:
    """β·Σd² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F) for one layer's adapter, in float32."""
    d = layer.lora_diag[adapter_name].float()
    A, B = layer.lora_A[adapter_name].weight.float(), layer.lora_B[adapter_name].weight.float()
    eye = torch.eye(d.shape[0], device=d.device)
    orthogonality = torch.linalg.matrix_norm(B.T @ B - eye) + torch.linalg.matrix_norm(A @ A.T - eye)
    return beta * d.square().sum() + gamma * orthogonality
