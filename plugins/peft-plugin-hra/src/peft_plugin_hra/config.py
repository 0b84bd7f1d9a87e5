"""``HRAConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import TunerConfig


@dataclass
class HRAConfig(TunerConfig):
    """HRA: ``W ↦ W·H₁⋯H_r``, a product of r Householder reflections of the weight's input side."""

    r: int = field(default=8, metadata={"help": "Number of reflections (even, for the identity start)."})
    apply_GS: bool = field(
        default=False, metadata={"help": "Orthonormalise the reflection vectors (Gram-Schmidt) before use."}
    )
    bias: str = field(default="none", metadata={"help": "Biases to train as well: 'none', 'all' or 'hra_only'."})
    init_weights: bool = field(
        default=True, metadata={"help": "Start as the identity (pairs of equal reflections). False: random."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "HRA"
