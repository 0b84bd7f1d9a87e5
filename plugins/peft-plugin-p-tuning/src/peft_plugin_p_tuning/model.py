"""``PromptEncoder``: the prompt encoder of p-tuning.

Learned embeddings ``E`` (one row of width ``token_dim`` per virtual token) pass through a
trainable network ``f``; the model sees the virtual tokens ``f(E)`` in front of its input:

* ``MLP``: ``f(E) = W₃·relu(W₂·relu(W₁·E + b₁) + b₂) + b₃`` (hidden width ``encoder_hidden_size``);
* ``LSTM``: a bidirectional LSTM over the virtual tokens (``encoder_num_layers`` layers, hidden
  width ``encoder_hidden_size`` each way, ``encoder_dropout`` between layers), then
  ``W₂·relu(W₁·h + b₁) + b₂`` on its ``2·encoder_hidden_size``-wide states.

A checkpoint holds ``f(E)`` (``prompt_embeddings``), not ``f``: built for loading
(``inference_mode``), the encoder is that table alone.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peft_kernel import PeftWarning

from .config import MLP_HIDDEN_LAYERS, PromptEncoderReparameterizationType


class PromptEncoder(nn.Module):
    """``forward(indices)`` gives the virtual tokens ``(batch, len(indices), token_dim)``."""

    #: checkpoint key -> parameter of this module (HF PEFT's layout)
    checkpoint_keys = {"prompt_embeddings": "embedding.weight"}
    #: the checkpoint holds the virtual tokens f(E), computed
    checkpoint_output_key = "prompt_embeddings"

    def __init__(self, config, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = PromptEncoderReparameterizationType(config.encoder_reparameterization_type)
        self.embedding = nn.Embedding(total, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return  # a loaded adapter is its table of virtual tokens
        if self.encoder_type == PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != MLP_HIDDEN_LAYERS:
                warnings.warn(f"encoder_num_layers={config.encoder_num_layers} is ignored by the MLP prompt encoder: "
                              f"it always has {MLP_HIDDEN_LAYERS} hidden layers (the option sizes the LSTM).",
                              PeftWarning, stacklevel=2)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        embeds = self.embedding(indices)
        if self.lstm_head is not None:
            embeds = self.lstm_head(embeds)[0]
        return self.mlp_head(embeds) if self.mlp_head is not None else embeds
