"""``VeraConfig``: HF PEFT's field set and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from peft_kernel import PeftWarning, TunerConfig


@dataclass
class VeraConfig(TunerConfig):
    """VeRA: ``h = W₀x + Λ_b B Λ_d A x`` with frozen random ``A`` (r × in) and ``B``
    (out × r) shared by all adapted layers, and trainable diagonal scalings ``Λ_d`` (r) and
    ``Λ_b`` (out) per layer.

    The shared projections are drawn once per adapter from ``projection_prng_key``, sized
    for the largest adapted layer; each layer uses the top-left slice it needs.
    """

    # HF PEFT's VeraConfig has no exclude_modules; keep the kernel's field out of the
    # constructor and out of adapter_config.json so files stay identical.
    exclude_modules: list[str] | str | None = field(
        default=None, init=False, repr=False, metadata={"runtime_only": True}
    )
    r: int = field(default=256, metadata={"help": "Rank of the shared projections (larger than typical LoRA ranks)."})
    projection_prng_key: int = field(
        default=0, metadata={"help": "Seed of the generator that draws the shared projections A and B."}
    )
    save_projection: bool = field(
        default=True,
        metadata={"help": "Store A and B in the checkpoint (base_model.vera_A / vera_B). False: regenerate them "
                          "from projection_prng_key on load (smaller files, relies on the same PRNG)."},
    )
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of every entry of vera_lambda_d."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the base stores weight as (in, out), e.g. GPT-2 Conv1D."}
    )
    bias: Literal["none", "all", "vera_only"] = field(
        default="none", metadata={"help": "Which biases train and are saved: 'none', 'all' or 'vera_only'."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: vera_lambda_b = 0 (no change at start) and vera_lambda_d = d_initial. False leaves "
                          "lambda_b at 1 and lambda_d random (tests only)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "VERA"
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'vera_only', got {self.bias!r}")
        if not self.save_projection:
            warnings.warn(
                "save_projection=False: vera_A and vera_B will not be stored with the adapter but regenerated from "
                "projection_prng_key when it is loaded. That relies on the same PRNG behaviour everywhere; keep "
                "save_projection=True to be sure the checkpoint restores exactly.",
                PeftWarning,
                stacklevel=3,
            )
