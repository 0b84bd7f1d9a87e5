"""Tiny models and helpers shared by the trainable-tokens tests (and the LoRA plugin's tests of
``trainable_token_indices``)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.testing.differential import tiny_llama, token_ids

TOKENS = [1, 5, 9, 40]  # some appear in the inputs below, some do not


def llama(tied: bool = False):
    torch.manual_seed(0)
    return tiny_llama(tied).eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = token_ids(batch=2, length=6)
    ids["input_ids"][0, :3] = torch.tensor(TOKENS[:3])  # the trained tokens are read
    return ids


def ours_name(hf_name: str) -> str:
    """HF PEFT's parameter name in our model: its LoRA wrapper's ``token_adapter.`` segment is not ours."""
    return hf_name.replace(".token_adapter.", ".")


def perturb_and_copy(hf: nn.Module, ours: nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Seeded noise on HF's trainable tensors, copied into ours by name (the names of tied
    layers, which HF also registers, aside)."""
    generator = torch.Generator().manual_seed(seed)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in sorted(hf.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
                mine[ours_name(name)].copy_(param)
    hf.eval(), ours.eval()
