"""``PrefixEncoder``: the prompt encoder of prefix tuning.

For ``n`` virtual tokens on a model with ``L`` layers whose keys and values have ``h`` heads of
``d`` dimensions (``token_dim = h·d``), the encoder's output is a table ``P`` of shape
``(n, L·2·token_dim)`` — the checkpoint's ``prompt_embeddings``. Row ``t`` holds, for each
layer ``l``, the key and the value that virtual token ``t`` contributes to that layer:

    P[t] = [ k_0 | v_0 | k_1 | v_1 | … | k_{L-1} | v_{L-1} ]       each of h·d numbers

``P`` is either trained directly (an ``nn.Embedding`` of that width) or, with
``prefix_projection``, computed as ``P = W₂·tanh(W₁·E + b₁) + b₂`` from a smaller embedding
``E`` of width ``token_dim``. A saved adapter always holds ``P`` itself.

Encoder-decoder models: HF PEFT gives decoder layer ``l`` the key/value slots ``2l mod L`` of
the table (the encoder gets none); this layout is kept so that checkpoints mean the same in
both libraries.

Everything around the encoder — putting the keys and values into the model's cache, masks,
positions, ``generate``, checkpoints — is the kernel's prompt-learning machinery.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """``forward(indices)`` gives the prefix table rows ``(batch, n, L·2·token_dim)``;
    ``key_values`` lays them out per layer."""

    #: checkpoint key -> parameter of this module (HF PEFT's layout)
    checkpoint_keys = {"prompt_embeddings": "embedding.weight"}
    #: the checkpoint holds the table P (computed when it is reparameterised)
    checkpoint_output_key = "prompt_embeddings"

    def __init__(self, config, word_embeddings: nn.Module | None = None) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.heads = config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads
        if self.heads * self.head_dim != config.token_dim:
            raise ValueError(f"token_dim {config.token_dim} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}; set both to the model's key/value layout")
        self.encoder_decoder = config.num_transformer_submodules == 2
        width = config.num_layers * 2 * config.token_dim
        n = config.num_virtual_tokens
        # a loaded adapter holds the table itself (the checkpoint has no MLP)
        self.prefix_projection = bool(config.prefix_projection) and not config.inference_mode
        if self.prefix_projection:
            self.embedding = nn.Embedding(n, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(n, width)
            last = self.embedding
        if config.init_weights == "zero":
            for param in last.parameters():
                nn.init.zeros_(param)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        table = self.embedding(indices)
        return self.transform(table) if self.prefix_projection else table

    def key_values(self, prompts: torch.Tensor) -> torch.Tensor:
        """``(batch, n, L·2·h·d)`` -> ``(layers, 2, batch, h, n, d)``: keys ``[:, 0]``, values ``[:, 1]``."""
        batch, n, _ = prompts.shape
        slots = prompts.view(batch, n, 2 * self.num_layers, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.encoder_decoder:  # decoder layer l reads slots (4l, 4l + 1) mod 2L (HF PEFT's layout)
            index = torch.arange(self.num_layers, device=prompts.device) * 4
            index = torch.stack((index, index + 1), dim=1).flatten() % (2 * self.num_layers)
            slots = slots[index]
        return slots.reshape(self.num_layers, 2, batch, self.heads, n, self.head_dim)
