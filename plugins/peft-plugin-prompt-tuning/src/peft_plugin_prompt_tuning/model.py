"""``PromptEmbedding``: the prompt encoder of prompt tuning, a plain embedding table.

Everything around it (inserting the virtual tokens, masks, labels, generation, several
adapters, checkpoints) is the kernel's generic prompt-learning machinery.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from peft_kernel import PeftWarning

from .config import PromptTuningInit


class PromptEmbedding(nn.Module):
    """``num_virtual_tokens * num_transformer_submodules`` trainable vectors of size
    ``token_dim``; ``forward(indices)`` looks them up."""

    #: checkpoint key -> parameter of this module (HF PEFT's layout)
    checkpoint_keys = {"prompt_embeddings": "embedding.weight"}

    def __init__(self, config, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        if config.inference_mode or self.embedding.weight.device.type == "meta":
            return  # weights are about to be loaded: skip data-dependent initialisation
        init = config.prompt_tuning_init  # a PromptTuningInit, or a subclass config's own choices
        if init == PromptTuningInit.SAMPLE_VOCAB:
            ids = torch.randint(0, word_embeddings.num_embeddings, (total,), dtype=torch.long)
            self._init_from_tokens(ids, word_embeddings)
        elif init == PromptTuningInit.TEXT:
            ids = text_token_ids(config)
            ids = (ids * math.ceil(total / len(ids)))[:total]
            self._init_from_tokens(torch.tensor(ids, dtype=torch.long), word_embeddings)

    def _init_from_tokens(self, ids: torch.Tensor, word_embeddings: nn.Module) -> None:
        device = word_embeddings.weight.device
        with torch.no_grad():
            vectors = word_embeddings(ids.to(device)).detach().clone().to(torch.float32)
        self.embedding.weight = nn.Parameter(vectors)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def text_token_ids(config) -> list[int]:
    """Token ids of ``config.prompt_tuning_init_text`` under the configured tokenizer."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is optional
        raise ImportError("prompt_tuning_init='TEXT' needs transformers (pip install "
                          "'peft-plugin-prompt-tuning[text-init]')") from exc
    kwargs = dict(config.tokenizer_kwargs or {})
    if kwargs.pop("trust_remote_code", None):
        warnings.warn("tokenizer_kwargs['trust_remote_code'] is ignored: initialising a prompt never runs code "
                      "from a model repository.", PeftWarning, stacklevel=4)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to no tokens")
    return list(ids)
