"""BD-LoRA, block-diagonal LoRA (``use_bdlora``).

In each target, one factor is block-diagonal with ``nblocks`` blocks: A (r × in) in the
targets named in ``target_modules_bd_a``, B (out × r) in those of ``target_modules_bd_b``
(``BdLoraConfig.side``). Under tensor parallelism with ``nblocks`` shards, a block-diagonal
A on a row-sharded layer (or B on a column-sharded one) keeps each shard's part of the
update on its own device, so serving many adapters needs no extra communication.

A block-diagonal factor is stored as its blocks stacked on the output dimension: weight
(out_f, in_f / nblocks), block j = rows j·out_f/nblocks … — HF PEFT's layout, so checkpoint
keys stay ``lora_A.weight`` / ``lora_B.weight``. A block-diagonal A starts Kaiming-uniform,
a block-diagonal B at zero (random with ``init_lora_weights=False``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import init_name
from . import LoraVariant


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear map whose (out × in) matrix is block-diagonal with ``nblocks``
    equal blocks; ``weight`` stacks the blocks: (out, in / nblocks)."""

    def __init__(self, in_features: int, out_features: int, nblocks: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.view(self.nblocks, self.out_features // self.nblocks, -1)  # (n, out/n, in/n)
        grouped = x.reshape(*x.shape[:-1], self.nblocks, self.in_features // self.nblocks)
        return torch.einsum("...ni,noi->...no", grouped, blocks).reshape(*x.shape[:-1], self.out_features)

    def dense(self) -> torch.Tensor:
        """The full (out × in) block-diagonal matrix."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


class BdLora(LoraVariant):
    field = "use_bdlora"
    title = "BD-LoRA"
    combinable = False  # a block-diagonal weight has another shape than a plain factor

    def init(self, layer, adapter_name: str, config, bdlora_side: str | None = None, **kwargs: Any) -> None:
        if bdlora_side is None:  # match_strict=False and no pattern matched: a plain LoRA
            return
        nblocks = config.use_bdlora.nblocks
        r = layer.r[adapter_name]
        factor = layer.lora_A[adapter_name] if bdlora_side == "A" else layer.lora_B[adapter_name]
        size, other = (layer.in_features, "in_features") if bdlora_side == "A" else (layer.out_features,
                                                                                     "out_features")
        if r % nblocks or size % nblocks:
            raise ValueError(f"BD-LoRA splits {bdlora_side} into nblocks={nblocks} blocks, so r={r} and {other}={size} "
                             f"of {type(layer.get_base_layer()).__name__} must be divisible by it; change r or nblocks")
        if bdlora_side == "B" and factor.bias is not None:
            raise ValueError("BD-LoRA with a block-diagonal B cannot have lora_bias=True; set lora_bias=False")
        shape = (layer.in_features, r) if bdlora_side == "A" else (r, layer.out_features)
        block = BlockDiagonalLinear(*shape, nblocks, device=factor.weight.device, dtype=factor.weight.dtype)
        if block.weight.device.type != "meta":
            with torch.no_grad():
                if bdlora_side == "B" and init_name(config.init_lora_weights) is not False:
                    block.weight.zero_()
                else:
                    nn.init.kaiming_uniform_(block.weight)
        (layer.lora_A if bdlora_side == "A" else layer.lora_B)[adapter_name] = block

    def update_factors(self, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        return tuple(f.dense() if isinstance(f, BlockDiagonalLinear) else f.weight for f in (A, B))
