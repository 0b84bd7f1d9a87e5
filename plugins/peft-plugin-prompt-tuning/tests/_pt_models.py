"""Tiny, deterministically seeded models for the prompt-tuning tests."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def t5():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(cfg).eval()


def _bert_config(**kw):
    import transformers

    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, **kw)


def bert_cls():
    import transformers

    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(_bert_config(num_labels=3)).eval()


def bert_token_cls():
    import transformers

    torch.manual_seed(0)
    return transformers.BertForTokenClassification(_bert_config(num_labels=5)).eval()


def bert():
    import transformers

    torch.manual_seed(0)
    return transformers.BertModel(_bert_config()).eval()


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


def ids(batch=2, length=6, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
