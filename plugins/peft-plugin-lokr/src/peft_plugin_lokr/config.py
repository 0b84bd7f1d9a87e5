"""``LoKrConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import LowRankDeltaConfig


@dataclass
class LoKrConfig(LowRankDeltaConfig):
    """LoKr: ``ΔW = (alpha / r) · W1 ⊗ W2`` on every targeted layer; ``r``, ``alpha``, the dropouts,
    the patterns and ``use_effective_conv2d`` (CP form of W2: ``lokr_t2``) are the kernel's
    :class:`peft_kernel.LowRankDeltaConfig` fields."""

    decompose_both: bool = field(
        default=False, metadata={"help": "Also make W1 a low-rank product (lokr_w1_a @ lokr_w1_b) where r is small."}
    )
    decompose_factor: int = field(
        default=-1, metadata={"help": "Split each dimension as (factor, dim / factor); -1: nearest to the square root."}
    )
    rank_dropout_scale: bool = field(
        default=False, metadata={"help": "Divide the rows kept by rank dropout by the kept fraction."}
    )
    init_weights: bool | str = field(
        default=True, metadata={"help": "True: W1 = 0 (identity). 'lycoris': W2 = 0 instead. False: all random."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOKR"
