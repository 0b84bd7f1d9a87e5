"""Tiny, deterministically seeded models for the adaption-prompt tests."""

from __future__ import annotations

import torch

VOCAB = 64
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(config_name: str, model_name: str, **overrides):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**_DECODER, **overrides})
    return getattr(transformers, model_name)(config).eval()


def llama(**overrides):
    """Grouped-query attention: 4 query heads over 2 key/value heads."""
    return _build("LlamaConfig", "LlamaForCausalLM", **overrides)


def llama_biased():
    """Llama with attention biases, set to non-zero values (transformers initialises them to 0)."""
    model = llama(attention_bias=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def mistral():
    return _build("MistralConfig", "MistralForCausalLM")


def qwen2():
    return _build("Qwen2Config", "Qwen2ForCausalLM")


def qwen3():
    return _build("Qwen3Config", "Qwen3ForCausalLM", head_dim=8)


def gpt2():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train() == eval()
    return transformers.GPT2LMHeadModel(config).eval()


def llama_seq_cls():
    return _build("LlamaConfig", "LlamaForSequenceClassification", num_labels=3)


def llama_wide_heads():
    """head_dim × heads (64) wider than hidden_size (32)."""
    return llama(head_dim=16)


MODELS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "gpt2": gpt2, "llama-biased": llama_biased,
          "llama-wide-heads": llama_wide_heads}
#: the models HF PEFT 0.21.2 supports (its model-type table)
HF_MODELS = ("llama", "mistral", "gpt2")


def ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def inputs() -> dict:
    return {"input_ids": ids()}
