"""The MiSS layers. Per adapter, a shard ``miss_block`` is repeated across the weight of a
linear layer (``out × in``). The default variant (``init_weights=True``) and "mini" add::

    ΔW[o, i] = B[i mod r, o]          B = miss_block: (r, out); "mini": (r, mini_r), repeated
                                      along the output features, B[:, o] = miss_block[:, o mod mini_r]

(the input features are summed in groups of r, then multiplied by B: the update is as cheap as a
rank-r one, though its rank is not bounded by r). The "bat" variant (:class:`MissBatLayer`) mixes
the shard with the frozen weight: with W cut into r × r blocks W[O, I] and one block per r output
rows, ``B[O] = miss_block[O]`` of shape (r, r)::

    W'[O, I] = W[O, I] (1 + B[O]) + B[O]      (merged as that transform; unmerged by its inverse)

Names, shapes and initialisation are HF PEFT's; the shard starts at zero (an identity). The
kernel's :class:`peft_kernel.WeightDeltaLayer` does the forward pass, merging, quantized bases
(dequantized for "bat", whose weight depends on W) and the input dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_kernel import WeightDeltaLayer


class MissLayer(WeightDeltaLayer):
    """MiSS's default and "mini" variants: an additive delta."""

    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_mini_r")

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        out, fan_in = self.delta_shape
        r, variant = config.r, config.init_weights
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        if r > fan_in:
            raise ValueError(f"`r` ({r}) must be less than or equal to in_features ({fan_in})")
        if (variant == "bat") != self.transforms_weight:
            raise ValueError(f"MiSS's 'bat' variant transforms the weight and cannot share a layer with its other "
                             f"variants (adapter {adapter_name!r}, init_weights={variant!r}); add it to a model "
                             "whose adapters on these layers are all 'bat', or none")
        self.miss_r[adapter_name], self.miss_mini_r[adapter_name] = r, config.mini_r
        self.input_dropout[adapter_name] = config.miss_dropout
        block = self.miss_block[adapter_name] = nn.Parameter(torch.empty(self._block_shape(config, out, fan_in)))
        if variant is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        else:
            nn.init.zeros_(block)  # ΔW = 0 (for "bat": W' = W): the adapter starts as an identity

    def _block_shape(self, config, out: int, fan_in: int) -> tuple[int, ...]:
        if config.init_weights != "mini":
            return config.r, out
        if out % config.mini_r:
            raise ValueError(f"'mini' repeats the shard along the output features: out_features ({out}) must be "
                             f"divisible by mini_r ({config.mini_r})")
        return config.r, config.mini_r

    def get_delta(self, adapter_name: str) -> torch.Tensor:
        block = self.miss_block[adapter_name]
        out, fan_in = self.delta_shape
        r = block.shape[0]
        rows = block.T.repeat(out // block.shape[1], 1)  # (out, r): "mini" repeats its columns along out
        return rows.repeat(1, -(-fan_in // r))[:, :fan_in]  # column i is rows[:, i mod r]

    def __repr__(self) -> str:
        return "miss." + super().__repr__()


class MissBatLayer(MissLayer):
    """MiSS's "bat" variant: a transform of the weight, block by block."""

    def _block_shape(self, config, out: int, fan_in: int) -> tuple[int, ...]:
        if fan_in % config.r or out % config.r:
            raise ValueError(f"'bat' cuts the weight ({out} × {fan_in}) into [r, r] blocks: both must be divisible "
                             f"by r ({config.r})")
        return out // config.r, config.r, config.r

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        block = self.miss_block[adapter_name]  # (out / r, r, r)
        tiles = _tiles(weight.to(block.dtype), block.shape[-1])  # (out / r, in / r, r, r)
        return _untile(tiles @ block[:, None] + tiles + block[:, None])

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        block = self.miss_block[adapter_name]
        tiles = _tiles(weight.to(block.dtype), block.shape[-1])
        one_plus = torch.eye(block.shape[-1], dtype=block.dtype, device=block.device) + block
        return _untile(torch.linalg.solve(one_plus[:, None], tiles - block[:, None], left=False))


def _tiles(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) as r × r blocks indexed [O, I]: (out / r, in / r, r, r)."""
    return weight.unflatten(0, (-1, r)).unflatten(2, (-1, r)).transpose(1, 2)


def _untile(tiles: torch.Tensor) -> torch.Tensor:
    return tiles.transpose(1, 2).flatten(2).flatten(0, 1)
