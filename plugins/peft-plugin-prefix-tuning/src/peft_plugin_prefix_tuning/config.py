"""``PrefixTuningConfig``: HF PEFT's fields and defaults, so configs load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import PromptLearningConfig


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: ``num_virtual_tokens`` learned keys and values in front of every
    attention layer's own; the model itself stays frozen.

    ``token_dim`` and ``num_attention_heads`` describe the attention's keys and values: on
    grouped-query models they become ``num_key_value_heads × head_dim`` and
    ``num_key_value_heads`` (HF PEFT's convention, so ``adapter_config.json`` files agree).
    """

    init_weights: str | None = field(
        default=None, metadata={"help": "None: random (standard normal) prefixes; 'zero': all-zero prefixes."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the prefix_projection MLP (default: token_dim)."}
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "Train the prefixes through a two-layer MLP from smaller embeddings."}
    )

    injects_key_values = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PREFIX_TUNING"
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None (random) or 'zero', got {self.init_weights!r}")

    def fill_derived_fields(self) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
