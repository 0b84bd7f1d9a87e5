"""``LoKrConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft_kernel import TunerConfig
from peft_kernel.targeting import pattern_value


@dataclass
class LoKrConfig(TunerConfig):
    """LoKr: ``ΔW = (alpha / r) · W1 ⊗ W2`` on every targeted layer."""

    r: int = field(default=8, metadata={"help": "Rank of the factors that are low-rank products."})
    alpha: int = field(default=8, metadata={"help": "The delta is scaled by alpha / r."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "In training, drop each output row of the delta with this probability."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "In training, skip the whole adapter of a layer with this probability."}
    )
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "Convolutions with a kernel larger than 1 factor W2 in CP form (lokr_t2)."}
    )
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
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module r: {name or regex: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha: {name or regex: alpha}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOKR"

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        return {"r": pattern_value(self.rank_pattern, target_name, self.r),
                "alpha": pattern_value(self.alpha_pattern, target_name, self.alpha)}
