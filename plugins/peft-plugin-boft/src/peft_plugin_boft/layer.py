"""The BOFT layer. Per adapter, the weight is rotated on its input side by a butterfly product
of ``m = boft_n_butterfly_factor`` block-diagonal orthogonal factors and its rows are scaled::

    W ↦ diag(s)·W·Mᵀ,   M = B_(m-1) ⋯ B₀,   Bᵢ = Pᵢ·blockdiag(Qᵢ₁ … Qᵢₙ)·Pᵢᵀ
    Qᵢⱼ = Cayley((Aᵢⱼ - Aᵢⱼᵀ) / 2)      boft_R: (m, n, b, b),  boft_s: (out, 1); conv (1, out)

``Pᵢ`` is the i-th butterfly permutation: within groups of ``b·2ⁱ`` entries it puts the halves
of blocks at even positions first, then the odd ones, so that factor i mixes entries ``b·2ⁱ⁻¹``
apart (``P₀ = I``). A convolution's weight is rotated over its flattened fan-in. Linear layers
(also Conv1D and quantized ones) rotate the input and scale the output (``base(x·M)``), so the
base layer runs as it is; convolutions use ``op(x, diag(s)·W·Mᵀ)``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from peft_kernel import WeightDeltaLayer
from peft_kernel.orthogonal import block_diagonal_matmul, cayley, drop_blocks


class BOFTLayer(WeightDeltaLayer):
    adapter_layer_names = ("boft_R", "boft_s")
    other_param_names = ("boft_block_size", "boft_block_num", "boft_dropout")

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        size = math.prod(self.delta_shape[1:])
        factors = config.boft_n_butterfly_factor
        block, count = _layout(size, config.boft_block_size, config.boft_block_num, factors)
        rotations = self.boft_R[adapter_name] = nn.Parameter(torch.zeros(factors, count, block, block))
        scales = self.boft_s[adapter_name] = nn.Parameter(torch.ones((1, self.out_features) if self.base_kind == "conv"
                                                                     else (self.out_features, 1)))
        if not config.init_weights:  # (by default M = I and s = 1: the adapter starts as the identity)
            nn.init.normal_(rotations, std=0.1)
            nn.init.normal_(scales, mean=1.0, std=0.1)
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = block, count
        self.boft_dropout[adapter_name] = config.boft_dropout

    def butterfly(self, x: torch.Tensor, adapter_name: str, transpose: bool = False) -> torch.Tensor:
        """``x @ M`` (``transpose``: ``x @ Mᵀ``) on the last dimension of ``x``, factor by factor."""
        rotations = self.boft_R[adapter_name]
        blocks = cayley((rotations - rotations.mT) / 2)
        p = self.boft_dropout[adapter_name]
        if self.training and p > 0:  # one random factor loses a fraction of its blocks
            dropped = int(torch.randint(0, len(blocks), (1,)))
            blocks = torch.stack([drop_blocks(f, p) if i == dropped else f for i, f in enumerate(blocks)])
        x = x.to(blocks.dtype)
        for i in range(len(blocks)) if transpose else reversed(range(len(blocks))):
            factor = blocks[i].mT if transpose else blocks[i]
            if i == 0:
                x = block_diagonal_matmul(x, factor)
                continue
            perm = _butterfly_permutation(x.shape[-1], len(factor) >> i, factor.shape[-1] // 2).to(x.device)
            x = block_diagonal_matmul(x[..., torch.argsort(perm)], factor)[..., perm]  # x·P·B·Pᵀ
        return x

    def _scales(self, adapter_name: str) -> torch.Tensor:
        return self.boft_s[adapter_name].reshape(-1, 1)

    # -- on activations (linear layers) and on weights ------------------------------------

    @property
    def transforms_activations(self) -> bool:
        return self.base_kind == "linear"

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.butterfly(x, adapter_name).to(x.dtype)

    def transform_output(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        bias, scales = self.bias, self._scales(adapter_name).squeeze(-1)
        return (y * scales if bias is None else (y - bias) * scales + bias).to(y.dtype)

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        flat = weight.flatten(1).to(self.boft_R[adapter_name].dtype)
        return (self.butterfly(flat, adapter_name, transpose=True) * self._scales(adapter_name)).reshape_as(weight)

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        flat = weight.flatten(1).to(self.boft_R[adapter_name].dtype) / self._scales(adapter_name)
        return self.butterfly(flat, adapter_name).reshape_as(weight)

    def __repr__(self) -> str:
        return "boft." + super().__repr__()


def _layout(size: int, block: int, count: int, factors: int) -> tuple[int, int]:
    """(block size, blocks per factor) for a rotated dimension of ``size``, or a clear error."""
    given, name = (count, "boft_block_num") if count else (block, "boft_block_size")
    if size % given:
        raise ValueError(f"{name}={given} does not divide the layer's input size {size}; choose a divisor of it")
    block, count = (size // count, count) if count else (block, size // block)
    if factors > 1 and (count % 2 ** (factors - 1) or block % 2):
        raise ValueError(
            f"boft_n_butterfly_factor={factors} needs an even block size and a number of blocks that is a multiple of "
            f"{2 ** (factors - 1)}; this layer (input size {size}) has {count} blocks of {block}. Use fewer factors or "
            "another block size."
        )
    return block, count


@functools.cache
def _butterfly_permutation(size: int, groups: int, half: int) -> torch.Tensor:
    """In each of ``groups`` equal groups, the chunks of ``half`` entries at even positions, then
    those at odd positions (indices into a dimension of ``size``)."""
    chunks = torch.arange(size // groups).view(-1, half)
    within = torch.cat([chunks[0::2], chunks[1::2]]).flatten()
    return (torch.arange(0, size, size // groups)[:, None] + within).flatten()
