"""``HiraConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft_kernel import TunerConfig
from peft_kernel.targeting import pattern_value


@dataclass
class HiraConfig(TunerConfig):
    """HiRA: ``ΔW = W₀ ⊙ (B A)`` on every targeted layer."""

    r: int = field(default=32, metadata={"help": "Rank of B A (the update itself can reach full rank)."})
    hira_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in training."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Whether the layer stores its weight as (in, out); set per layer for you."}
    )
    init_weights: bool | str | None = field(
        default=True,
        metadata={"help": "True: A Kaiming-uniform, B = 0 (identity). 'gaussian': A ~ N(0, 1/r²), B = 0. "
                          "False: both random (tests)."},
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module r: {name or regex: r}."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "HIRA"
        if isinstance(self.init_weights, str) and self.init_weights.lower() != "gaussian":
            raise ValueError(f"Unknown HiRA init_weights={self.init_weights!r}; use True, False or 'gaussian'")

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        return {"r": pattern_value(self.rank_pattern, target_name, self.r)}
