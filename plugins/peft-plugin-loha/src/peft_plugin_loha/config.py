"""``LoHaConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft_kernel import TunerConfig
from peft_kernel.targeting import pattern_value


@dataclass
class LoHaConfig(TunerConfig):
    """LoHa: ``ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)`` on every targeted layer."""

    r: int = field(default=8, metadata={"help": "Rank of each of the two factorisations."})
    alpha: int = field(default=8, metadata={"help": "The delta is scaled by alpha / r."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "In training, drop each output row of the delta with this probability."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "In training, skip the whole adapter of a layer with this probability."}
    )
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "Convolutions with a kernel larger than 1 use the CP form (hada_t1, hada_t2)."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start as an identity (hada_w2_b = 0). False: all factors random (tests)."}
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module r: {name or regex: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha: {name or regex: alpha}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LOHA"

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        return {"r": pattern_value(self.rank_pattern, target_name, self.r),
                "alpha": pattern_value(self.alpha_pattern, target_name, self.alpha)}
