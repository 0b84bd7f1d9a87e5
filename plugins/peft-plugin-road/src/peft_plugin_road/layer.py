"""The RoAd layer. Per adapter, the output of the base layer is rotated and scaled pair by pair::

    y = R (W x + b),   R = blockdiag of  [[c_j, −s_j], [s_k, c_k]]  on the pairs (j, k = j + g/2)

of each group of ``g = group_size`` output features, with ``c = α cos θ`` and ``s = α sin θ`` from
``road_theta`` and ``road_alpha``: ``road_1`` has one (θ, α) per pair (out / 2 each), ``road_2`` one
per feature (out), ``road_4`` separate ones for c and s (2·out, as [θ_c; θ_s] per group). The
forward pass applies R to the base output element-wise (cheap, exact, any base layer, mixed
batches); merging writes ``R W`` and ``R b`` into the base and unmerging applies R⁻¹, the
pairwise inverse, in closed form. Names, shapes and initialisation are HF PEFT's.
"""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel import AdapterLayer, WeightDeltaLayer

from .config import VARIANTS


class RoadLayer(WeightDeltaLayer):
    adapter_layer_names = ("road_theta", "road_alpha")
    other_param_names = ("variant", "group_size")

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        out = self.delta_shape[0]
        if out % config.group_size:
            raise ValueError(f"RoAd pairs output features within groups of group_size ({config.group_size}), which "
                             f"must divide out_features ({out}); choose a smaller group_size")
        self.variant[adapter_name], self.group_size[adapter_name] = config.variant, config.group_size
        size = int(out * VARIANTS[config.variant])
        theta = self.road_theta[adapter_name] = nn.Parameter(torch.empty(size))
        alpha = self.road_alpha[adapter_name] = nn.Parameter(torch.empty(size))
        if config.init_weights is False:
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        else:  # θ = 0, α = 1: R = I, the adapter starts as an identity
            nn.init.zeros_(theta)
            nn.init.ones_(alpha)

    def _columns(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, s), one entry per output feature."""
        theta, alpha, variant = self.road_theta[adapter_name], self.road_alpha[adapter_name], self.variant[adapter_name]
        half = self.group_size[adapter_name] // 2
        if variant == "road_1":  # a group's pairs share (θ, α): both halves of the group read them
            theta, alpha = (t.unflatten(0, (-1, half)).repeat(1, 2).flatten() for t in (theta, alpha))
        if variant == "road_4":  # per group: [θ for c, θ for s], likewise α
            theta, alpha = theta.unflatten(0, (-1, 2, 2 * half)), alpha.unflatten(0, (-1, 2, 2 * half))
            return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()
        return alpha * theta.cos(), alpha * theta.sin()

    def _inverse_columns(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(c', s') of R⁻¹: each pair's 2 × 2 block inverted in closed form."""
        c, s = self._columns(adapter_name)
        partner_c, partner_s = (_swap_halves(t, self.group_size[adapter_name]) for t in (c, s))
        det = c * partner_c + s * partner_s
        return partner_c / det, -s / det

    def _rotate(self, y: torch.Tensor, adapter_name: str, inverse: bool = False) -> torch.Tensor:
        """R y (or R⁻¹ y) along the last dimension of ``y``."""
        c, s = self._inverse_columns(adapter_name) if inverse else self._columns(adapter_name)
        y = y.to(c.dtype)
        halves = y.unflatten(-1, (-1, 2, self.group_size[adapter_name] // 2))
        partner = torch.stack((-halves[..., 1, :], halves[..., 0, :]), dim=-2).flatten(-3)
        return y * c + partner * s

    # the forward pass rotates the base output (the base runs once, unchanged); merging uses the transform
    forward_active = AdapterLayer.forward_active

    def adapter_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str, *args, **kwargs):
        return self._rotate(result, adapter_name).to(result.dtype)

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate(weight.T, adapter_name).T

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate(weight.T, adapter_name, inverse=True).T

    def transform_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        return None if bias is None else self._rotate(bias, adapter_name)

    def untransform_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate(bias, adapter_name, inverse=True)

    def __repr__(self) -> str:
        return "road." + super().__repr__()


def _swap_halves(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each group's two halves exchanged: entry j of a group moves to j ± group_size / 2."""
    return values.unflatten(-1, (-1, 2, group_size // 2)).flip(-2).flatten(-3)
