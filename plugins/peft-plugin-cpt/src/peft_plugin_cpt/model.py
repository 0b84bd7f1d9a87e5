"""``CPTEmbedding``: the prompt encoder of context-aware prompt tuning, with its loss.

The prompt is ``n`` tokens of in-context examples (``cpt_token_ids``) with types ``τ``
(``cpt_tokens_type_mask``). Its virtual tokens are

    p_t = E_t + δ_t

where ``E`` are the word embeddings of the prompt's tokens (frozen) and ``δ`` trainable
corrections (zero at the start). Only template and input tokens (``τ mod 4 ∈ {1, 2, 3}``) train;
the gradient of the other rows of ``δ`` is zero. Before every forward, each ``δ_t`` is projected
back onto the ball of radius ``ε_t``: ``δ_t ← δ_t · ε_t / max(‖δ_t‖, ε_t)``, with
``ε_t = opt_projection_format_epsilon · √(token_dim/2048)`` for templates (``τ mod 4 ∈ {1, 3}``),
``opt_projection_epsilon · √(token_dim/2048)`` for inputs (``τ mod 4 = 2``), ``10⁻¹⁰`` otherwise.
(This is projected gradient descent: the optimizer's step is clipped at the next forward.)

The loss is next-token cross-entropy over the prompt *and* the input: prompt tokens of a label
type (``τ > 0``, ``τ mod 4 = 0``) are targets too, with their own token ids; the input's types
(``input_type_mask``, default 4) are shifted past the prompt's largest type. With
``opt_weighted_loss_type="decay"`` the targets of the ``k``-th label type counted back from the
last weigh ``opt_loss_decay_factor^k``; the loss is the mean of the weighted terms.

A checkpoint holds ``p`` (``prompt_embeddings``); built for loading, ``E`` is that table and ``δ``
starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: label value the loss ignores
IGNORE_INDEX = -100
#: ε of tokens that never train
MIN_EPSILON = 1e-10
#: input_type_mask default: every input token is a label of the next example
INPUT_LABEL_TYPE = 4


class CPTEmbedding(nn.Module):
    """``forward(indices)`` gives ``E + δ`` rows; ``loss`` is CPT's weighted loss."""

    checkpoint_keys = {"prompt_embeddings": "embedding.weight"}
    #: the checkpoint holds E + δ
    checkpoint_output_key = "prompt_embeddings"
    #: E never trains
    frozen_parameters = ("embedding.weight",)
    #: the input's token types, a keyword of the PeftModel's forward
    forward_inputs = ("input_type_mask",)

    def __init__(self, config, word_embeddings: nn.Module) -> None:
        super().__init__()
        n, dim = config.num_virtual_tokens, config.token_dim
        self.token_ids = list(config.cpt_token_ids)
        self.types = list(config.cpt_tokens_type_mask)
        self.loss_type = config.opt_weighted_loss_type
        self.decay = config.opt_loss_decay_factor
        scale = torch.sqrt(torch.tensor([dim / 2048], dtype=torch.float32))
        self.input_epsilon = config.opt_projection_epsilon * scale
        self.format_epsilon = config.opt_projection_format_epsilon * scale
        self.embedding = nn.Embedding(n, dim)
        if not config.inference_mode and self.embedding.weight.device.type != "meta":
            ids = torch.tensor(self.token_ids, dtype=torch.long, device=word_embeddings.weight.device)
            with torch.no_grad():
                vectors = word_embeddings(ids).detach().clone().to(torch.float32)
            self.embedding.weight = nn.Parameter(vectors)
        self.embedding.requires_grad_(False)
        self.delta_embedding = nn.Embedding(n, dim)
        # zeros on a real device even when built on "meta" (low_cpu_mem_usage): no checkpoint holds δ
        zeros = torch.zeros(n, dim, dtype=torch.float32, device=word_embeddings.weight.device)
        self.delta_embedding.weight = nn.Parameter(zeros)

    # -- the prompt -----------------------------------------------------------------------

    def epsilon(self) -> torch.Tensor:
        """The radius ``ε_t`` of each token's correction."""
        types = torch.tensor(self.types, dtype=torch.long)
        eps = torch.full((len(self.types),), MIN_EPSILON, dtype=torch.float32)
        kind = types % 4
        eps[(types > 0) & ((kind == 1) | (kind == 3))] = self.format_epsilon
        eps[(types > 0) & (kind == 2)] = self.input_epsilon
        return eps

    def project(self) -> None:
        """Scale every ``δ_t`` longer than ``ε_t`` back to length ``ε_t`` (in place, no gradient)."""
        weight = self.delta_embedding.weight
        if weight.device.type == "meta":
            return
        with torch.no_grad():
            norms = weight.norm(p=2, dim=1)
            eps = self.epsilon().to(weight.device)
            factor = torch.where(norms > 0, eps / norms.clamp(min=eps), torch.ones_like(norms))
            weight.data.mul_(factor.unsqueeze(1).to(weight.dtype))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        self.project()
        trainable = (torch.tensor(self.types, device=indices.device) % 4 != 0)[indices].unsqueeze(-1)
        delta = self.delta_embedding(indices)
        delta = torch.where(trainable, delta, delta.detach())  # frozen rows count, but get no gradient
        with torch.no_grad():
            base = self.embedding(indices)
        return base + delta

    # -- the loss ---------------------------------------------------------------------------

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, input_type_mask: torch.Tensor | None = None):
        """CPT's loss; ``logits`` cover prompt + input, ``labels`` and ``input_type_mask`` the input."""
        device = logits.device
        batch = labels.shape[0]
        prompt_types = torch.tensor(self.types, dtype=torch.long, device=device).expand(batch, -1)
        if input_type_mask is None:
            input_types = torch.full(labels.shape, INPUT_LABEL_TYPE, dtype=torch.long, device=device)
        else:
            input_types = input_type_mask.to(device=device, dtype=torch.long)
        input_types = torch.where(input_types > 0, input_types + prompt_types.max(), input_types)
        types = torch.cat((prompt_types, input_types), dim=1)
        prompt_ids = torch.tensor(self.token_ids, dtype=torch.long, device=device).expand(batch, -1)
        targets = torch.cat((prompt_ids, labels.to(device)), dim=1)
        targets = targets.masked_fill(~((types > 0) & (types % 4 == 0)), IGNORE_INDEX)
        targets, types = targets[:, 1:], types[:, 1:]  # position t predicts token t + 1
        terms = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none",
                                ignore_index=IGNORE_INDEX).view(targets.shape)
        counted = targets != IGNORE_INDEX
        if not counted.any():
            raise ValueError(
                "CPT's loss has no target: no token of the prompt or the input has a label type (> 0 and a multiple "
                f"of 4). The input's types are input_type_mask (default {INPUT_LABEL_TYPE}) plus the prompt's largest "
                f"type ({max(self.types)}); give cpt_tokens_type_mask whose largest type is a multiple of 4, or pass "
                "input_type_mask."
            )
        weights = counted.to(terms.dtype)
        if self.loss_type == "decay":
            weights = weights * self._decay_weights(types).to(terms.dtype)
        return (terms[counted] * weights[counted]).mean()

    def _decay_weights(self, types: torch.Tensor) -> torch.Tensor:
        """``decay^k`` for the tokens of the ``k``-th label type counted back from the last one."""
        weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
        for row in range(types.shape[0]):
            label_types = types[row][(types[row] > 0) & (types[row] % 4 == 0)].unique()
            for k, label_type in enumerate(label_types.flip(0).tolist()):
                weights[row][types[row] == label_type] = self.decay**k
        return weights
