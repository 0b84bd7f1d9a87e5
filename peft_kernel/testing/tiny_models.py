"""Tiny, deterministically seeded transformers models for method tests (hidden size 32, two
layers, a 64-token vocabulary): each call builds the same weights, so a test can rebuild the
base model of an adapter. ``transformers`` is imported when a model is built.

* :func:`llama` — a causal LM with grouped-query attention (4 query heads, 2 key/value heads);
* :func:`t5` — an encoder-decoder LM;
* :func:`bert`, :func:`bert_cls`, :func:`bert_token_cls`, :func:`bert_qa` — an encoder and its
  feature-extraction, sequence-classification, token-classification and question-answering forms;
* :func:`ids` — a seeded batch of token ids (never the special ids 0-2).
"""

from __future__ import annotations

import torch

VOCAB = 64
#: the task type each builder's model serves
TASK_TYPES = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "FEATURE_EXTRACTION", "bert_cls": "SEQ_CLS",
              "bert_token_cls": "TOKEN_CLS", "bert_qa": "QUESTION_ANS"}


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


def _bert(cls_name: str, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, **kw)
    return getattr(transformers, cls_name)(cfg).eval()


def bert():
    return _bert("BertModel")


def bert_cls():
    return _bert("BertForSequenceClassification", num_labels=3)


def bert_token_cls():
    return _bert("BertForTokenClassification", num_labels=5)


def bert_qa():
    return _bert("BertForQuestionAnswering")


def ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
