"""``OFTConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from peft_kernel import PeftWarning, TunerConfig


@dataclass
class OFTConfig(TunerConfig):
    """OFT: the weight's input side is rotated by a block-diagonal orthogonal matrix, ``W ↦ W·Rᵀ``."""

    r: int = field(default=0, metadata={"help": "Number of blocks per layer (set r or oft_block_size, not both)."})
    oft_block_size: int = field(default=32, metadata={"help": "Size of each rotation block (or set r instead)."})
    module_dropout: float = field(
        default=0.0, metadata={"help": "In training, this fraction of a layer's blocks is replaced by the identity."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the base stores weight as (in, out), e.g. GPT-2 Conv1D."}
    )
    bias: Literal["none", "all", "oft_only"] = field(
        default="none", metadata={"help": "Biases to train as well: 'none', 'all' or 'oft_only'."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Start as the identity. False: random (tests only)."})
    coft: bool = field(default=False, metadata={"help": "Constrained OFT: keep each block within eps of I."})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius (only with coft=True)."})
    block_share: bool = field(default=False, metadata={"help": "One rotation block shared by all blocks."})
    use_cayley_neumann: bool = field(
        default=True, metadata={"help": "Approximate the Cayley transform's inverse by a Neumann series."}
    )
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of that series."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "OFT"
        if not (self.r != 0) ^ (self.oft_block_size != 0):
            raise ValueError(
                f"Set exactly one of `r` ({self.r}) and `oft_block_size` ({self.oft_block_size}) to a non-zero value: "
                "r x oft_block_size is the layer's input size, so the other one follows."
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OFTConfig:
        if "oft_block_size" not in data:
            raise ValueError(
                "This OFT adapter config has no `oft_block_size`: it was saved by PEFT < 0.14, whose OFT weights do "
                "not work with today's OFT. Retrain the adapter, or load it with PEFT 0.13."
            )
        version = str(data.get("peft_version") or "0").partition("+")[0].partition("@")[0]
        if data.get("use_cayley_neumann") and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 18):
            warnings.warn("This OFT adapter was saved by PEFT < 0.18, whose Cayley-Neumann series differed slightly; "
                          "its outputs here differ a little from when it was trained.", PeftWarning, stacklevel=2)
        return super().from_dict(data)
