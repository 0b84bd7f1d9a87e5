"""``BOFTConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import TunerConfig


@dataclass
class BOFTConfig(TunerConfig):
    """BOFT: ``W ↦ diag(s)·W·Mᵀ``, M a butterfly product of block-diagonal orthogonal factors."""

    boft_block_size: int = field(
        default=4, metadata={"help": "Size of each orthogonal block (set it or boft_block_num, not both)."}
    )
    boft_block_num: int = field(default=0, metadata={"help": "Number of blocks per factor (or boft_block_size)."})
    boft_n_butterfly_factor: int = field(
        default=1, metadata={"help": "Butterfly factors; each doubles the reach of a block (1: plain OFT blocks)."}
    )
    boft_dropout: float = field(
        default=0.0, metadata={"help": "In training, this fraction of one random factor's blocks is the identity."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the base stores weight as (in, out), e.g. GPT-2 Conv1D."}
    )
    bias: str = field(default="none", metadata={"help": "Biases to train as well: 'none', 'all' or 'boft_only'."})
    init_weights: bool = field(default=True, metadata={"help": "Start as the identity. False: random (tests only)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "BOFT"
        if not (self.boft_block_size != 0) ^ (self.boft_block_num != 0):
            raise ValueError(
                f"Set exactly one of `boft_block_size` ({self.boft_block_size}) and `boft_block_num` "
                f"({self.boft_block_num}) to a non-zero value: their product is the layer's input size."
            )
        if self.boft_n_butterfly_factor < 1:
            raise ValueError(
                f"`boft_n_butterfly_factor` must be a positive integer, got {self.boft_n_butterfly_factor}"
            )
