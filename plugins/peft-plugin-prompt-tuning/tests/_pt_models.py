"""Tiny, deterministically seeded models for the prompt-tuning tests: the kernel's shared tiny
transformers models, and a model that is not a transformers model."""

from __future__ import annotations

import torch
from torch import nn

from peft_kernel.testing.tiny_models import VOCAB, bert, bert_cls, bert_token_cls, ids, llama, t5

__all__ = ["VOCAB", "TinyEncoder", "bert", "bert_cls", "bert_token_cls", "ids", "llama", "t5"]


class TinyEncoder(nn.Module):
    """Not a transformers model: embeddings, one mixing layer, a head; accepts inputs_embeds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.mix(h))
        h = h + h.mean(dim=1, keepdim=True)  # every position sees every other one
        return self.head(h)

