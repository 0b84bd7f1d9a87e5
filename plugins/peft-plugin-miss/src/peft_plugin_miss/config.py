"""``MissConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import TunerConfig

VARIANTS = (True, False, "bat", "mini")


@dataclass
class MissConfig(TunerConfig):
    """MiSS: one shard B repeated across the weight, ``ΔW[o, i] = B[i mod r, o]`` (or "bat" / "mini")."""

    r: int = field(default=64, metadata={"help": "Rows of the shard: the input features are taken in groups of r."})
    miss_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in training."})
    mini_r: int = field(
        default=1, metadata={"help": "'mini': columns of the shard, repeated across the output features."}
    )
    init_weights: bool | str = field(
        default=True,
        metadata={"help": "True: the shard (r, out), zero. 'bat': an (r, r) block per r output rows that also "
                          "multiplies the frozen weight. 'mini': an (r, mini_r) shard. False: random (tests)."},
    )
    bias: str = field(
        default="none", metadata={"help": "Biases also trained and saved: 'none', 'all' or 'miss_only'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "MISS"
        if self.init_weights not in VARIANTS:
            raise ValueError(f"init_weights={self.init_weights!r} is not a MiSS variant; use one of {VARIANTS}")
