"""``CPTConfig``: HF PEFT's fields and defaults, so configs load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import PromptLearningConfig

#: opt_weighted_loss_type values
LOSS_TYPES = ("none", "decay")


@dataclass
class CPTConfig(PromptLearningConfig):
    """Context-aware prompt tuning: the prompt is ``cpt_token_ids`` (in-context examples), each
    token typed by ``cpt_tokens_type_mask``; corrections to its embeddings are trained within
    an ε-ball. Causal LMs only.

    Token types, per example ``e`` (1-based): ``4e-3`` input template, ``4e-2`` input,
    ``4e-1`` output template, ``4e`` label; 0 is none of these. The input after the prompt
    (typed by ``input_type_mask`` in forward, default 4 = label) continues the numbering.
    """

    cpt_token_ids: list[int] | None = field(default=None, metadata={"help": "Token ids of the prompt (default [0])."})
    cpt_mask: list[int] | None = field(default=None, metadata={"help": "Attention mask of the prompt (all ones)."})
    cpt_tokens_type_mask: list[int] | None = field(
        default=None, metadata={"help": "Type of each prompt token (see the class docstring; default all 1)."}
    )
    opt_weighted_loss_type: str | None = field(
        default="none", metadata={"help": "'none': plain mean; 'decay': earlier examples' labels weigh less."}
    )
    opt_loss_decay_factor: float | None = field(
        default=1.0, metadata={"help": "Weight factor per example going back from the input ('decay')."}
    )
    opt_projection_epsilon: float | None = field(
        default=0.1, metadata={"help": "Norm bound of the corrections to input tokens (scaled by √(token_dim/2048))."}
    )
    opt_projection_format_epsilon: float | None = field(
        default=0.1, metadata={"help": "Norm bound of the corrections to template tokens (same scaling)."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Kept for HF PEFT configs; unused."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "CPT"
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"CPT supports task_type='CAUSAL_LM' only, got {self.task_type!r}")
        # the model dimensions are always the model's; the prompt is one stack of cpt_token_ids
        self.num_layers = self.token_dim = self.num_attention_heads = None
        self.num_transformer_submodules = 1
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.num_virtual_tokens = len(self.cpt_token_ids)
        if self.cpt_mask is None:
            self.cpt_mask = [1] * self.num_virtual_tokens
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * self.num_virtual_tokens
        if not len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask):
            raise ValueError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length")
        if self.opt_weighted_loss_type not in LOSS_TYPES:
            raise ValueError(f"opt_weighted_loss_type must be one of {LOSS_TYPES}, got {self.opt_weighted_loss_type!r}")
