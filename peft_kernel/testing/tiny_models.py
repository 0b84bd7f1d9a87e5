"""Tiny, deterministically seeded models for method tests: the same name (or builder) always gives
the same weights, so a test can rebuild the base model of an adapter (to load a checkpoint onto it,
or to compare with the adapted model), and HF PEFT's model and ours can start from one base.

    model = build("conv2d")            # a fresh copy, in eval mode (built once, then deep-copied)
    out = model(inputs("conv2d"))      # the model's seeded input batch

Torch networks, one kind of layer each (:data:`MODELS` by name):

* ``"mlp"`` — :class:`MLP`, linear layers ``lin0`` (10→16), ``lin1`` (16→12), ``lin2`` (12→4);
  ``"mlp8"`` the same on 8 inputs (room for blocks of 2 and 4); ``"mlp_wide"`` 10→20→30→4, and
  ``"mlp_wide_nobias"`` without biases;
* ``"conv1d"``, ``"conv2d"``, ``"conv3d"`` — kernels of 3 and of 1 (a grouped one, stride 2, for
  2-D); ``"conv1d_wide"`` — one Conv1d 64→64 (room for factorisations of the channels);
* ``"conv3"`` / ``"conv2"`` — :class:`ConvNet`: ``conv0`` (padding 1) and ``conv1`` (stride 2),
  square kernels of 3 / 2 (fan-ins 18, 36 / 8, 16);
* ``"odd-conv3"`` / ``"odd-conv2"`` — :class:`OddConvNet`: a ``(k, 1)`` kernel with ``(1, 0)``
  padding, a grouped, dilated, reflect-padded ``k×k`` convolution and a ``Conv1d`` (fan-ins 6, 18,
  12 / 4, 8, 8), the ones implementations get wrong;
* ``"embedding"`` — :class:`EmbeddingNet`, ``emb`` (20×8, padding index 0), then ``lin``.

Transformers models (hidden size 32, two layers, a 64-token vocabulary; keyword
arguments override config fields, e.g. ``llama(num_hidden_layers=3)``); ``transformers`` is
imported only when one is built; each builder seeds torch with 0 first:

* :func:`llama` (``"llama"``) — a causal LM with grouped-query attention (4 query heads, 2
  key/value heads, 48 MLP features); :func:`decoder` builds any Llama-like family or head the same
  way (``decoder("Qwen3", head_dim=8)``, ``decoder("Llama", "ForSequenceClassification", num_labels=3)``);
* :func:`gpt2` (``"gpt2"``) — a causal LM whose projections are ``Conv1D`` layers (no dropout);
* :func:`t5` — an encoder-decoder LM;
* :func:`bert`, :func:`bert_cls`, :func:`bert_token_cls`, :func:`bert_qa` — an encoder and its
  feature-extraction, sequence-classification, token-classification and question-answering forms
  (:data:`TASK_TYPES` names the task type each one serves).

:func:`ids` is a seeded batch of token ids (never the special ids 0-2).
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB = 64
#: the task type each transformers builder's model serves
TASK_TYPES = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "FEATURE_EXTRACTION",
              "bert_cls": "SEQ_CLS", "bert_token_cls": "TOKEN_CLS", "bert_qa": "QUESTION_ANS"}
_SPECIAL_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, **_SPECIAL_TOKENS)


# -- transformers models ------------------------------------------------------------------------


def _transformers_model(config_class: str, model_class: str, defaults: dict, overrides: dict) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**defaults, **overrides})
    return getattr(transformers, model_class)(config).eval()


def decoder(family: str = "Llama", head: str = "ForCausalLM", **overrides: Any) -> nn.Module:
    """A tiny decoder-only model of a Llama-like transformers ``family`` (Llama, Mistral, Qwen2,
    Qwen3, ...) with the given ``head``."""
    return _transformers_model(f"{family}Config", f"{family}{head}", _DECODER, overrides)


def llama(**overrides: Any) -> nn.Module:
    return decoder("Llama", **overrides)


def gpt2(**overrides: Any) -> nn.Module:
    defaults = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_SPECIAL_TOKENS,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train() == eval()
    return _transformers_model("GPT2Config", "GPT2LMHeadModel", defaults, overrides)


def t5(**overrides: Any) -> nn.Module:
    defaults = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _transformers_model("T5Config", "T5ForConditionalGeneration", defaults, overrides)


def _bert(model_class: str, **overrides: Any) -> nn.Module:
    defaults = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64)
    return _transformers_model("BertConfig", model_class, defaults, overrides)


def bert(**overrides: Any) -> nn.Module:
    return _bert("BertModel", **overrides)


def bert_cls(**overrides: Any) -> nn.Module:
    return _bert("BertForSequenceClassification", **{"num_labels": 3, **overrides})


def bert_token_cls(**overrides: Any) -> nn.Module:
    return _bert("BertForTokenClassification", **{"num_labels": 5, **overrides})


def bert_qa(**overrides: Any) -> nn.Module:
    return _bert("BertForQuestionAnswering", **overrides)


def ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# -- torch networks -----------------------------------------------------------------------------


class MLP(nn.Module):
    """Linear layers ``lin0``, ``lin1``, ... of the given ``sizes``, ReLUs between them."""

    def __init__(self, sizes: tuple[int, ...] = (10, 16, 12, 4), bias: bool = True):
        super().__init__()
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            self.add_module(f"lin{i}", nn.Linear(fan_in, fan_out, bias=bias))
        self.depth = len(sizes) - 1

    def forward(self, x):
        for i in range(self.depth):
            x = getattr(self, f"lin{i}")(x if i == 0 else torch.relu(x))
        return x


class Conv1dNet(nn.Module):
    """Conv1d with a kernel of 3, then one with a kernel of 1."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv1d(4, 6, 3, padding=1), nn.Conv1d(6, 6, 1)
        self.head = nn.Linear(6 * 9, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class WideConv1dNet(nn.Module):
    """One Conv1d 64→64 with a kernel of 3 (room for factorisations of the channels)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.head = nn.Conv1d(64, 64, 3, padding=1), nn.Linear(64 * 5, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv0(x)).flatten(1))


class Conv2dNet(nn.Module):
    """Conv2d 3×3, a grouped 3×3 (stride 2) and a 1×1."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3)
        self.conv1 = nn.Conv2d(8, 8, 3, groups=2, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.head = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.head(torch.relu(self.conv2(h)).flatten(1))


class Conv3dNet(nn.Module):
    """Conv3d 3×3×3, then a 1×1×1."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv3d(2, 4, 3), nn.Conv3d(4, 4, 1)
        self.head = nn.Linear(4 * 2 * 2 * 2, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv1(torch.relu(self.conv0(x)))).flatten(1))


class _ConvHead(nn.Module):
    """Convolutions (``convs``), then a linear head sized by one dry run on a 7×7 input."""

    def __init__(self, *convs: nn.Module):
        super().__init__()
        for i, conv in enumerate(convs):
            self.add_module(f"conv{i}", conv)
        self.flatten_before = [isinstance(conv, nn.Conv1d) for conv in convs]  # a Conv1d reads (C, H·W)
        with torch.no_grad():
            features = self.features(torch.zeros(1, 2, 7, 7)).shape[1]
        self.head = nn.Linear(features, 4)

    def features(self, x):
        for i, flatten in enumerate(self.flatten_before):
            x = torch.relu(getattr(self, f"conv{i}")(x.flatten(2) if flatten else x))
        return x.flatten(1)

    def forward(self, x):
        return self.head(self.features(x))


class ConvNet(_ConvHead):
    def __init__(self, kernel: int = 3):
        super().__init__(nn.Conv2d(2, 4, kernel, padding=1), nn.Conv2d(4, 4, kernel, stride=2))


class OddConvNet(_ConvHead):
    def __init__(self, kernel: int = 3):
        super().__init__(nn.Conv2d(2, 4, (kernel, 1), padding=(1, 0)),
                         nn.Conv2d(4, 4, kernel, groups=2, dilation=2, padding=kernel - 1, padding_mode="reflect"),
                         nn.Conv1d(4, 4, kernel))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x))).mean(1)


#: every tiny model by name
MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP, "mlp8": functools.partial(MLP, (8, 16, 12, 4)), "mlp_wide": functools.partial(MLP, (10, 20, 30, 4)),
    "mlp_wide_nobias": functools.partial(MLP, (10, 20, 30, 4), bias=False),
    "conv1d": Conv1dNet, "conv1d_wide": WideConv1dNet, "conv2d": Conv2dNet, "conv3d": Conv3dNet,
    "conv3": ConvNet, "conv2": functools.partial(ConvNet, 2), "odd-conv3": OddConvNet,
    "odd-conv2": functools.partial(OddConvNet, 2), "embedding": EmbeddingNet,
    "llama": llama, "gpt2": gpt2, "t5": t5, "bert": bert, "bert_cls": bert_cls, "bert_token_cls": bert_token_cls,
    "bert_qa": bert_qa,
}
#: the names of the transformers models (token ids as inputs)
TRANSFORMERS = frozenset(TASK_TYPES)
_SHAPES = {"mlp": (10,), "mlp8": (8,), "mlp_wide": (10,), "mlp_wide_nobias": (10,), "conv1d": (4, 9),
           "conv1d_wide": (64, 5), "conv2d": (3, 9, 9), "conv3d": (2, 4, 4, 4), "conv3": (2, 7, 7), "conv2": (2, 7, 7),
           "odd-conv3": (2, 7, 7), "odd-conv2": (2, 7, 7)}

_BUILT: dict = {}


def build(model: str | Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """A fresh copy of the model ``model`` (a name of :data:`MODELS` or a builder), in eval mode:
    built once under ``torch.manual_seed(seed)``, then deep-copied; the first build leaves torch's
    generator as it was."""
    builder = MODELS[model] if isinstance(model, str) else model
    if (builder, seed) not in _BUILT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _BUILT[builder, seed] = builder().eval()
    return copy.deepcopy(_BUILT[builder, seed])


def inputs(name: str, batch: int = 3, seed: int = 1) -> Any:
    """The seeded input batch of the model ``name`` (``{"input_ids": ...}`` for transformers models)."""
    if name in TRANSFORMERS:
        return {"input_ids": ids(batch, seed=seed)}
    generator = torch.Generator().manual_seed(seed)
    if name == "embedding":
        return torch.randint(0, 20, (batch, 5), generator=generator)
    return torch.randn(batch, *_SHAPES[name], generator=generator)
