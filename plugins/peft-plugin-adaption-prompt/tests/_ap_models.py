"""The adaption-prompt tests' models: the kernel's tiny decoders of every family the method
supports, and two variants its attention must handle."""

from __future__ import annotations

import torch

from peft_kernel.testing.tiny_models import decoder, gpt2, ids, llama


def llama_biased():
    """Llama with attention biases, set to non-zero values (transformers initialises them to 0)."""
    model = llama(attention_bias=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def llama_wide_heads():
    """head_dim × heads (64) wider than hidden_size (32)."""
    return llama(head_dim=16)


MODELS = {"llama": llama, "mistral": lambda: decoder("Mistral"), "qwen2": lambda: decoder("Qwen2"), "gpt2": gpt2,
          "llama-biased": llama_biased, "llama-wide-heads": llama_wide_heads}
#: the models HF PEFT 0.21.2 supports (its model-type table)
HF_MODELS = ("llama", "mistral", "gpt2")


def inputs() -> dict:
    return {"input_ids": ids()}
