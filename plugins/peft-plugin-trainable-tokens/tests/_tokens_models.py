"""Tiny models and helpers shared by the trainable-tokens tests (and the LoRA plugin's tests of
``trainable_token_indices``)."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.testing.differential import VOCAB, token_ids

TOKENS = [1, 5, 9, 40]  # some appear in the inputs below, some do not


def llama(tied: bool = False) -> nn.Module:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


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
