"""``RoadConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import TunerConfig

#: parameters per output feature (of road_theta and of road_alpha) for each variant
VARIANTS = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(TunerConfig):
    """RoAd: pairs of output features rotated by θ and scaled by α, ``y = R (W x + b)``."""

    # HF PEFT's RoadConfig has no such fields; they work here and are saved when set
    fields_written_when_set = ("exclude_modules", "layers_to_transform", "layers_pattern")

    variant: str = field(
        default="road_1",
        metadata={"help": "road_1: one (θ, α) per pair of outputs; road_2: one per output; road_4: two per output."},
    )
    group_size: int = field(
        default=64,
        metadata={"help": "Outputs are paired within groups of this many: feature j with j + group_size / 2. "
                          "Even, and a divisor of every adapted layer's out_features; a speed knob only."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "True: θ = 0, α = 1 (identity). False: random (tests)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "ROAD"
        if self.variant not in VARIANTS:
            raise ValueError(f"Invalid variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
