"""Models and inputs shared by the trainable-tokens tests."""

from __future__ import annotations

import torch

from peft_kernel.testing import tiny_models as M

TOKENS = [1, 5, 9, 40]  # some appear in the inputs below, some do not


def llama(tied: bool = False):
    return M.llama(tie_word_embeddings=tied)


def inputs() -> dict[str, torch.Tensor]:
    ids = M.ids(batch=2, length=6, seed=1)
    ids[0, :3] = torch.tensor(TOKENS[:3])  # the trained tokens are read
    return {"input_ids": ids}


def ours_name(hf_name: str) -> str:
    """HF PEFT's parameter name in our model: its LoRA wrapper's ``token_adapter.`` segment is not ours."""
    return hf_name.replace(".token_adapter.", ".")
