"""``LoraConfig``: the same fields and defaults as HF PEFT, so configs load both ways."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from peft_kernel import TunerConfig
from peft_kernel.targeting import get_pattern_key

#: fields HF PEFT knows whose features this plugin does not implement yet
_NOT_YET = (
    "megatron_config", "trainable_token_indices", "eva_config", "corda_config", "lora_ga_config", "velora_config",
    "alora_invocation_tokens", "monteclora_config", "layer_replication", "target_parameters", "use_bdlora",
    "arrow_config", "kasa_config",
)


@dataclass
class LoraRuntimeConfig:
    """Settings that only affect this process; never saved."""

    ephemeral_gpu_offload: bool = False


@dataclass
class LoraConfig(TunerConfig):
    """Low-rank adaptation: ``W x + (lora_alpha / r) * B A x`` with trainable ``A`` (r × in)
    and ``B`` (out × r)."""

    r: int = field(default=8, metadata={"help": "Rank of the update."})
    lora_alpha: int = field(default=8, metadata={"help": "Scale numerator: scaling = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the base stores weight as (in, out), e.g. GPT-2 Conv1D."}
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata={"help": "Which biases train and are saved."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling lora_alpha / sqrt(r)."})
    init_lora_weights: bool | str = field(
        default=True,
        metadata={"help": "True (Kaiming A, zero B), False (random, for tests), 'gaussian', 'pissa', "
                          "'pissa_niter_N', 'olora', 'orthogonal', or 'loftq' (not yet)."},
    )
    rank_pattern: dict | None = field(default_factory=dict, metadata={"help": "Module name/regex -> rank."})
    alpha_pattern: dict | None = field(default_factory=dict, metadata={"help": "Module name/regex -> alpha."})
    megatron_config: dict | None = field(default=None, metadata={"help": "Not supported yet."})
    megatron_core: str | None = field(default="megatron.core", metadata={"help": "Not supported yet."})
    trainable_token_indices: list | dict | None = field(default=None, metadata={"help": "Not supported yet."})
    loftq_config: dict | Any = field(default_factory=dict, metadata={"help": "Not supported yet."})
    eva_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    corda_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    lora_ga_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    velora_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    alora_invocation_tokens: list[int] | None = field(default=None, metadata={"help": "Not supported yet."})
    use_qalora: bool = field(default=False, metadata={"help": "Not supported yet."})
    qalora_group_size: int = field(default=16, metadata={"help": "Not supported yet."})
    monteclora_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    layer_replication: list | None = field(default=None, metadata={"help": "Not supported yet."})
    runtime_config: LoraRuntimeConfig = field(
        default_factory=LoraRuntimeConfig, metadata={"help": "Runtime settings (not saved).", "runtime_only": True}
    )
    lora_bias: bool = field(default=False, metadata={"help": "Trainable bias on lora_B (for extracted LoRAs)."})
    target_parameters: list[str] | None = field(default=None, metadata={"help": "Not supported yet."})
    use_bdlora: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    arrow_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    kasa_config: Any | None = field(default=None, metadata={"help": "Not supported yet."})
    ensure_weight_tying: bool = field(default=False, metadata={"help": "Accepted for compatibility."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "LORA"
        if isinstance(self.runtime_config, dict):
            self.runtime_config = LoraRuntimeConfig(**self.runtime_config)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` must be a positive integer, got {self.r!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        valid_inits = (True, False, "gaussian", "pissa", "olora", "orthogonal")
        if init not in valid_inits and not (isinstance(init, str) and init.startswith("pissa_niter_")):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported by peft-plugin-lora; use one of {valid_inits} "
                "or 'pissa_niter_N'."
            )
        for name in _NOT_YET:
            if getattr(self, name):
                raise NotImplementedError(f"LoraConfig.{name} is not supported by peft-plugin-lora yet")
        if self.loftq_config or self.use_qalora:
            raise NotImplementedError("LoftQ and QA-LoRA are not supported by peft-plugin-lora yet")
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and isinstance(init, str) and (
            init.startswith("pissa") or init == "olora"
        ):
            import warnings

            warnings.warn("rsLoRA with rank_pattern/alpha_pattern cannot be converted to plain LoRA on save.",
                          stacklevel=3)

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        r = (
            self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), target_name), self.r)
            if self.rank_pattern else self.r
        )
        alpha = (
            self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), target_name), self.lora_alpha)
            if self.alpha_pattern else self.lora_alpha
        )
        return {"r": r, "lora_alpha": alpha}

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r
