"""The OFT layer. Per adapter, the weight is rotated on its input side by a block-diagonal
orthogonal matrix ``R = blockdiag(Q₁ … Q_r)``::

    W ↦ W·Rᵀ      (a linear layer then computes base(x·R): OFT rotates the input)
    Qᵢ = Cayley(Sᵢ), Sᵢ skew-symmetric with its upper triangle in oft_R: (r, b(b-1)/2)

A convolution's weight is rotated over its flattened fan-in ``in / groups · prod(kernel_size)``
(channel-major, as torch flattens it); an embedding's rows are rotated (``E ↦ E·R``, the output
side) and the tensor is ``oft_embedding_R``. ``block_share`` keeps one block for all; ``coft``
projects each ``Sᵢ`` into the Frobenius ball of radius ``eps / √(blocks)`` before every use, in
place, as HF PEFT does. Linear layers (also Conv1D and quantized ones) rotate the input and
embeddings the output, so the base layer runs as it is; convolutions use ``op(x, W·Rᵀ)``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from peft_kernel import PeftWarning, WeightDeltaLayer
from peft_kernel.orthogonal import block_diagonal_matmul, cayley, drop_blocks, skew_symmetric


class OFTLayer(WeightDeltaLayer):
    adapter_layer_names = ("oft_R", "oft_embedding_R")
    other_param_names = ("r", "oft_block_size", "oft_config")
    container_types = {"oft_R": nn.ModuleDict, "oft_embedding_R": nn.ModuleDict}

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        size = self.out_features if self.base_kind == "embedding" else math.prod(self.delta_shape[1:])
        r, block = _blocks_of(size, config.r, config.oft_block_size)
        entries = nn.Parameter(torch.empty(1 if config.block_share else r, block * (block - 1) // 2))
        if config.init_weights:
            nn.init.zeros_(entries)  # R = I: the adapter starts as the identity
        else:
            nn.init.normal_(entries, std=0.1)
        container = self.oft_embedding_R if self.base_kind == "embedding" else self.oft_R
        container[adapter_name] = nn.ParameterDict({"weight": entries})
        self.r[adapter_name], self.oft_block_size[adapter_name], self.oft_config[adapter_name] = r, block, config

    def rotation_blocks(self, adapter_name: str, dropout: bool = False) -> torch.Tensor:
        """The orthogonal blocks ``Qᵢ`` (r or 1, b, b); ``dropout``: the training-time ones."""
        config = self.oft_config[adapter_name]
        entries = (self.oft_R if adapter_name in self.oft_R else self.oft_embedding_R)[adapter_name]["weight"]
        size = self.oft_block_size[adapter_name]
        if config.coft:
            with torch.no_grad():
                entries.copy_(_within_ball(entries, size, config.eps / torch.tensor(len(entries)).sqrt()))
        skew = skew_symmetric(entries, size)
        blocks = _cayley_neumann(skew, config.num_cayley_neumann_terms) if config.use_cayley_neumann else cayley(skew)
        if dropout and config.module_dropout > 0 and len(blocks) > 1:
            blocks = drop_blocks(blocks, config.module_dropout)
        return blocks

    # -- the rotation on activations (linear: input, embedding: output) and on weights -----

    @property
    def transforms_activations(self) -> bool:
        return self.base_kind != "conv"

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate(x, adapter_name) if self.base_kind == "linear" else x

    def transform_output(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate(y, adapter_name) if self.base_kind == "embedding" else y

    def _rotate(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        blocks = self.rotation_blocks(adapter_name, dropout=self.training)
        return block_diagonal_matmul(x.to(blocks.dtype), blocks).to(x.dtype)

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate_weight(weight, self.rotation_blocks(adapter_name))

    def training_transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._rotate_weight(weight, self.rotation_blocks(adapter_name, dropout=True))

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        # the inverse, not the transpose: a truncated Neumann series is only nearly orthogonal
        return self._rotate_weight(weight, torch.linalg.inv(self.rotation_blocks(adapter_name)))

    def _rotate_weight(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        weight = weight.to(blocks.dtype)
        if self.base_kind == "embedding":  # canonical (dim, num) = Eᵀ: E ↦ E·R
            return block_diagonal_matmul(weight.T, blocks).T
        return block_diagonal_matmul(weight.flatten(1), blocks.mT).reshape_as(weight)  # W ↦ W·Rᵀ

    def __repr__(self) -> str:
        return "oft." + super().__repr__()


def _blocks_of(size: int, r: int, block: int) -> tuple[int, int]:
    """(blocks, block size) for a rotated dimension of ``size``; like HF PEFT, a requested value
    that does not divide ``size`` becomes the nearest divisor, with a warning."""
    wanted = r or block
    fitted = _nearest_divisor(size, wanted)
    if fitted != wanted:
        name = "r" if r else "oft_block_size"
        warnings.warn(f"Invalid `{name}` ({wanted}) for a dimension of {size}! Adjusted `{name}` to ({fitted}).",
                      PeftWarning, stacklevel=3)
    return (fitted, size // fitted) if r else (size // fitted, fitted)


def _nearest_divisor(n: int, k: int) -> int:
    if k >= n:
        return n
    lower = max(d for d in range(1, k + 1) if n % d == 0)
    higher = min(d for d in range(k, n + 1) if n % d == 0)
    return lower if k - lower <= higher - k else higher


def _within_ball(entries: torch.Tensor, size: int, radius: torch.Tensor) -> torch.Tensor:
    """Each row's skew matrix scaled back onto the Frobenius ball of ``radius`` when outside it
    (computed as HF PEFT does, so that projected checkpoints agree bit for bit)."""
    norm = skew_symmetric(entries, size).norm(dim=(-2, -1))[:, None]
    return torch.where(norm <= radius, entries, radius * (entries / norm))


def _cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """HF PEFT's Cayley-Neumann rotation for ``terms``: the series of ``(I + S)(I - S)⁻¹`` =
    ``cayley(-S)``, ``I + 2S + 2S² + … + S^(terms-1)``. HF 0.21.2 keeps four terms for 3, and
    ``I + 2S`` for 2."""
    if terms <= 2:
        eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
        return eye + 2 * skew if terms == 2 else eye.expand_as(skew)
    return cayley(-skew, neumann_terms=max(terms, 4) - 1)
