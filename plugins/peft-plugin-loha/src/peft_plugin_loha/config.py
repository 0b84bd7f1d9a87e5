"""``LoHaConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import LowRankDeltaConfig


@dataclass
class LoHaConfig(LowRankDeltaConfig):
    """LoHa: ``ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)`` on every targeted layer; ``r``, ``alpha``, the
    dropouts, the patterns and ``use_effective_conv2d`` (CP form: ``hada_t1``, ``hada_t2``) are the
    kernel's :class:`peft_kernel.LowRankDeltaConfig` fields."""

    init_weights: bool = field(
        default=True, metadata={"help": "Start as an identity (hada_w2_b = 0). False: all factors random (tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOHA"
