"""``LoraConfig``: the same fields and defaults as HF PEFT, so configs load both ways.

The sub-configs (``LoftQConfig``, ``EvaConfig``, ``CordaConfig`` for the data- and
quantization-aware inits, ``ArrowConfig``) live here too: plain dataclasses, so this module stays torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from peft_kernel import PeftWarning, TunerConfig
from peft_kernel.targeting import get_pattern_key

from .variant_configs import BdLoraConfig, KasaConfig, MontecloraConfig, VeloraConfig

#: the variants of ``variants.VARIANTS``: config field -> sub-config class
_VARIANT_CONFIGS = {"kasa_config": KasaConfig, "use_bdlora": BdLoraConfig, "velora_config": VeloraConfig,
                    "monteclora_config": MontecloraConfig}

#: fields HF PEFT knows whose features this plugin does not implement yet
_NOT_YET = (
    "megatron_config",
)


#: init_lora_weights values besides "pissa_niter_N"
_INITS = (True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq", "eva", "corda", "lora_ga")


@dataclass
class LoftQConfig:
    """LoftQ (``init_lora_weights="loftq"``): quantize the base weight and let the adapter
    start from the best rank-r fit of the quantization error."""

    loftq_bits: int = field(default=4, metadata={"help": "4 (NormalFloat-4, block-wise) or 8 (int8, row-wise)."})
    loftq_iter: int = field(default=1, metadata={"help": "Alternations of quantize / truncated SVD."})

    def __post_init__(self) -> None:
        if self.loftq_bits not in (4, 8):
            raise ValueError(f"loftq_bits must be 4 (nf4) or 8 (int8), got {self.loftq_bits!r}")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be a positive integer, got {self.loftq_iter!r}")


@dataclass
class EvaConfig:
    """EVA (``init_lora_weights="eva"``): A starts as the top right-singular vectors of each
    layer's inputs, with ranks redistributed across layers by explained variance."""

    rho: float = field(default=2.0, metadata={"help": "A layer may get up to round(rho * r) ranks (>= 1)."})
    tau: float = field(default=0.99, metadata={"help": "A layer is done once successive components have cos >= tau."})
    use_label_mask: bool = field(default=True, metadata={"help": "Skip tokens whose label is label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "The ignored-label value."})
    whiten: bool = field(default=False, metadata={"help": "Divide each component by √(its singular value)."})
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "Scale lora_alpha with the new rank so that alpha / r stays the same."}
    )

    def __post_init__(self) -> None:
        if self.rho < 1.0:
            raise ValueError(f"EvaConfig.rho must be >= 1.0, got {self.rho!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"EvaConfig.tau must lie in [0, 1], got {self.tau!r}")


@dataclass
class CordaConfig:
    """CorDA (``init_lora_weights="corda"``): the adapter starts from the decomposition of
    W·C, C the covariance of the layer's inputs on sample data (``preprocess_corda``)."""

    cache_file: str | None = field(default=None, metadata={"help": "File for the decompositions (reused if present)."})
    covariance_file: str | None = field(default=None, metadata={"help": "File for the covariances (reused if there)."})
    corda_method: Literal["ipm", "kpm"] = field(
        default="ipm", metadata={"help": "'ipm': largest components (fast tuning); 'kpm': smallest (keeps knowledge)."}
    )
    verbose: bool = field(default=False, metadata={"help": "Print progress."})
    use_float16_for_covariance: bool = field(
        default=False, metadata={"help": "Accumulate covariances in the model's dtype instead of float32."}
    )
    prune_temporary_fields: bool = field(default=True, metadata={"help": "Drop the covariances once decomposed."})

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise ValueError(f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}")


@dataclass
class LoraGAConfig:
    """LoRA-GA (``init_lora_weights="lora_ga"``): the adapter starts from the singular vectors of
    the weight's gradient on sample data (``preprocess_loraga``), so that its first steps follow
    full fine-tuning; the base keeps ``W - scaling · B A``."""

    direction: Literal["ArBr", "A2rBr", "ArB2r", "random"] = field(
        default="ArB2r",
        metadata={"help": "Which of the top 2r gradient components go to A and B: 'ArB2r' (A the first r, B the "
                          "next r), 'A2rBr' (the reverse), 'ArBr' (alternating: B even, A odd) or 'random'."},
    )
    scale: Literal["stable", "weight_svd", "gd_scale", "unit"] = field(
        default="stable",
        metadata={"help": "Scale of the start: 'stable' (B · out^¼ / √stable_gamma), 'weight_svd' (B's top singular "
                          "value set to the weight's), 'gd_scale' (A and B divided by the LoRA scaling) or 'unit'."},
    )
    stable_gamma: int = field(default=16, metadata={"help": "γ of the 'stable' scale."})

    def __post_init__(self) -> None:
        if self.direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
            raise ValueError(f"LoraGAConfig.direction must be 'ArBr', 'A2rBr', 'ArB2r' or 'random', got "
                             f"{self.direction!r}")
        if self.scale not in ("stable", "weight_svd", "gd_scale", "unit"):
            raise ValueError(f"LoraGAConfig.scale must be 'stable', 'weight_svd', 'gd_scale' or 'unit', got "
                             f"{self.scale!r}")
        if not self.stable_gamma > 0:
            raise ValueError(f"LoraGAConfig.stable_gamma must be positive, got {self.stable_gamma!r}")


def _sub_config(value, cls, name: str):
    """``value`` as a ``cls`` instance (configs loaded from JSON hold plain dicts)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"LoraConfig.{name} must be a {cls.__name__}, a dict or None, got {type(value).__name__}")


def init_name(init: bool | str) -> bool | str:
    """``init_lora_weights`` as the layers compare it: HF PEFT accepts ``"olora"`` and
    ``"gaussian"`` in any case (the other names are case-sensitive); the config keeps the spelling."""
    if isinstance(init, str) and init.lower() in ("olora", "gaussian"):
        return init.lower()
    return init


@dataclass
class ArrowConfig:
    """Arrow: route every token to the ``top_k`` task LoRAs (experts) whose prototype (the top
    right singular vector of B·A) is most aligned with it, weighted by a softmax over
    ``|x · prototype| / router_temperature``. GenKnowSub (``use_gks``) first subtracts the mean
    of general LoRAs' factors from every expert. Built by :func:`create_arrow_model`."""

    top_k: int = field(default=3, metadata={"help": "Experts combined per token."})
    router_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the routing weights."})
    use_gks: bool = field(default=False, metadata={"help": "GenKnowSub: subtract the general LoRAs' mean first."})
    task_adapter_names: list[str] | None = field(
        default=None, init=False, metadata={"help": "Expert adapters (set by create_arrow_model)."}
    )
    gks_adapter_names: list[str] | None = field(
        default=None, init=False, metadata={"help": "General adapters for GenKnowSub (set by create_arrow_model)."}
    )
    rng_seed: int | None = field(
        default=None,
        metadata={"help": "Accepted for compatibility; prototypes are computed exactly, without random draws."},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k <= 0:
            raise ValueError(f"ArrowConfig.top_k must be a positive integer, got {self.top_k!r}")
        if self.router_temperature <= 0:
            raise ValueError(f"ArrowConfig.router_temperature must be > 0, got {self.router_temperature!r}")

    @classmethod
    def from_dict(cls, data: dict) -> ArrowConfig:
        """From its ``adapter_config.json`` form (the adapter-name lists included)."""
        init = {k: v for k, v in data.items() if k in ("top_k", "router_temperature", "use_gks", "rng_seed")}
        config = cls(**init)
        config.task_adapter_names = data.get("task_adapter_names")
        config.gks_adapter_names = data.get("gks_adapter_names")
        return config


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
                          "'pissa_niter_N', 'olora', 'orthogonal', 'loftq', 'eva', 'corda' or 'lora_ga'."},
    )
    rank_pattern: dict | None = field(default_factory=dict, metadata={"help": "Module name/regex -> rank."})
    alpha_pattern: dict | None = field(default_factory=dict, metadata={"help": "Module name/regex -> alpha."})
    megatron_config: dict | None = field(default=None, metadata={"help": "Not supported yet."})
    megatron_core: str | None = field(default="megatron.core", metadata={"help": "Not supported yet."})
    trainable_token_indices: list | dict | None = field(
        default=None,
        metadata={"help": "Token ids whose embedding rows train next to the adapter: a list (the input embeddings) or "
                          "{module name: ids}; a head tied to the embeddings follows (peft-plugin-trainable-tokens)."},
    )
    loftq_config: dict | Any = field(default_factory=dict, metadata={"help": "LoftQConfig (stored as a dict)."})
    eva_config: EvaConfig | None = field(default=None, metadata={"help": "EvaConfig for init_lora_weights='eva'."})
    corda_config: CordaConfig | None = field(default=None, metadata={"help": "CordaConfig for init 'corda'."})
    lora_ga_config: LoraGAConfig | None = field(
        default=None, metadata={"help": "LoraGAConfig for init_lora_weights='lora_ga' (see preprocess_loraga)."}
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    velora_config: VeloraConfig | None = field(
        default=None, metadata={"help": "VeLoRA: A's backward keeps rank-1 projections of sub-tokens (VeloraConfig)."}
    )
    alora_invocation_tokens: list[int] | None = field(
        default=None,
        metadata={"help": "Activated LoRA: token ids of the invocation sequence. The adapter applies from its last "
                          "occurrence on; earlier tokens see the base model (so their KV cache is the base model's)."},
    )
    use_qalora: bool = field(
        default=False, metadata={"help": "QA-LoRA on GPTQ layers: A sees the input mean-pooled in groups."}
    )
    qalora_group_size: int = field(default=16, metadata={"help": "QA-LoRA: input features pooled per group."})
    monteclora_config: MontecloraConfig | None = field(
        default=None, metadata={"help": "MonteCLoRA: A as a learned mixture of noisy copies in training."}
    )
    layer_replication: list | None = field(
        default=None,
        metadata={"help": "[start, end) ranges of layers to stack, e.g. [[0, 4], [2, 5]]; repeated layers share base "
                          "weights and get their own adapter."},
    )
    runtime_config: LoraRuntimeConfig = field(
        default_factory=LoraRuntimeConfig, metadata={"help": "Runtime settings (not saved).", "runtime_only": True}
    )
    lora_bias: bool = field(default=False, metadata={"help": "Trainable bias on lora_B (for extracted LoRAs)."})
    target_parameters: list[str] | None = field(
        default=None,
        metadata={"help": "Bare nn.Parameters to adapt, as '<module>.<parameter>' (exact or dotted suffix), e.g. "
                          "'experts.gate_up_proj' (2-D or 3-D, dim 0 = expert)."},
    )
    use_bdlora: BdLoraConfig | None = field(
        default=None, metadata={"help": "BD-LoRA: a block-diagonal A or B per target (BdLoraConfig)."}
    )
    arrow_config: ArrowConfig | None = field(
        default=None,
        metadata={"help": "Makes this adapter an Arrow router over the layer's other LoRAs (ArrowConfig)."},
    )
    kasa_config: KasaConfig | None = field(
        default=None,
        metadata={"help": "KaSA: drop W's r smallest singular components, learn B diag(d) A (KasaConfig)."},
    )
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
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            for key, value in (pattern or {}).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
                        name == "rank_pattern" and not float(value).is_integer()):
                    kind = "a positive integer rank" if name == "rank_pattern" else "a positive number"
                    raise ValueError(f"{name}[{key!r}] must be {kind}, got {value!r}")
        self.rank_pattern = {k: int(v) for k, v in (self.rank_pattern or {}).items()} or self.rank_pattern
        init = init_name(self.init_lora_weights)
        if init not in _INITS and not (isinstance(init, str) and init.startswith("pissa_niter_")
                                       and init[len("pissa_niter_"):].isdigit()):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported by peft-plugin-lora; use one of {_INITS} "
                "or 'pissa_niter_N' (as in HF PEFT, only 'olora' and 'gaussian' may be written in any case)."
            )
        if self.use_qalora and (not isinstance(self.qalora_group_size, int) or self.qalora_group_size <= 0):
            raise ValueError(f"qalora_group_size must be a positive integer, got {self.qalora_group_size!r}")
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True cannot be combined with DoRA (use_dora=True); set one of them to False")
        if self.megatron_config:
            raise NotImplementedError(
                "LoraConfig.megatron_config (LoRA on Megatron-LM's tensor-parallel linear layers) is not supported by "
                "peft-plugin-lora: it needs megatron-core's ColumnParallelLinear / RowParallelLinear, which no "
                "peft-kernel plugin wraps. Convert the model to transformers layers, or use HF PEFT with Megatron."
            )
        for name in _NOT_YET:
            if getattr(self, name):
                raise NotImplementedError(f"LoraConfig.{name} is not supported by peft-plugin-lora yet")
        self._check_init_sub_configs()
        self._check_trainable_token_indices()
        if self.lora_bias and init not in (True, False):
            raise ValueError(
                f"lora_bias=True works only with init_lora_weights=True or False (got {init!r}): the other inits "
                "derive the factors from the base weight or data and have no bias to start from."
            )
        self._check_structural_fields()
        if self.use_rslora and (self.rank_pattern or self.alpha_pattern) and isinstance(init, str) and (
            init.startswith("pissa") or init in ("olora", "corda", "lora_ga")
        ):
            warnings.warn("rsLoRA with rank_pattern/alpha_pattern cannot be converted to plain LoRA on save.",
                          stacklevel=3)

    def _check_structural_fields(self) -> None:
        """aLoRA, Arrow, target_parameters and layer_replication."""
        init = init_name(self.init_lora_weights)
        if isinstance(self.arrow_config, dict):
            self.arrow_config = ArrowConfig.from_dict(self.arrow_config)
        if self.alora_invocation_tokens is not None:
            tokens = self.alora_invocation_tokens
            if not tokens or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise ValueError(f"alora_invocation_tokens must be a non-empty list of token ids, got {tokens!r}")
            self.alora_invocation_tokens = list(tokens)
            if self.task_type != "CAUSAL_LM":
                warnings.warn("aLoRA (alora_invocation_tokens) is meant for task_type='CAUSAL_LM'.", stacklevel=4)
        for name, cls in _VARIANT_CONFIGS.items():
            setattr(self, name, _sub_config(getattr(self, name), cls, name))
        variants = [name for name, on in (("use_dora", self.use_dora), ("alora_invocation_tokens",
                    self.alora_invocation_tokens is not None), ("arrow_config", self.arrow_config is not None),
                    ("use_qalora", self.use_qalora),
                    *((name, getattr(self, name) is not None) for name in _VARIANT_CONFIGS)) if on]
        if len(variants) > 1:
            raise ValueError(f"{' and '.join(variants)} cannot be combined in one LoRA adapter; choose one")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) for t in self.target_parameters):
                raise ValueError("target_parameters must be a list of '<module>.<parameter>' names, got "
                                 f"{self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters)
            refused = {"lora_dropout": self.lora_dropout, "lora_bias": self.lora_bias, "use_dora": self.use_dora,
                       "fan_in_fan_out": self.fan_in_fan_out,
                       f"init_lora_weights={init!r}": init not in (True, False, "gaussian")}
            refused = [name for name, value in refused.items() if value]
            if refused:
                raise ValueError(f"target_parameters cannot be combined with {', '.join(refused)}: the update of a "
                                 "parameter is folded into the weight. Unset them, or use target_modules only.")
        if self.layer_replication is not None:
            ranges = self.layer_replication
            if not all(isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(i, int) for i in r)
                       for r in ranges):
                raise ValueError(f"layer_replication must be a list of [start, end) pairs, got {ranges!r}")
            self.layer_replication = [list(r) for r in ranges]

    def _check_trainable_token_indices(self) -> None:
        """A list of token ids, or ``{module name: ids}``; none of those modules also fully trained."""
        value = self.trainable_token_indices
        if value is None:
            return
        per_module = value if isinstance(value, dict) else {None: value}
        for name, ids in per_module.items():
            if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                where = "trainable_token_indices" + ("" if name is None else f"[{name!r}]")
                raise ValueError(f"{where} must be a list of non-negative token ids, got {ids!r}")
        both = sorted(n for n in per_module if n is not None and n in (self.modules_to_save or ()))
        if both:
            raise ValueError(f"{both} are in modules_to_save (fully trained) and in trainable_token_indices (some rows "
                             "trained); list each module in only one of them")

    def _check_init_sub_configs(self) -> None:
        """Sub-configs as dataclasses (dicts when loaded from JSON); the one an init needs
        is required (LoftQ) or defaulted (EVA, CorDA), the others are ignored with a warning."""
        init = self.init_lora_weights
        self.eva_config = _sub_config(self.eva_config, EvaConfig, "eva_config")
        self.corda_config = _sub_config(self.corda_config, CordaConfig, "corda_config")
        self.lora_ga_config = _sub_config(self.lora_ga_config, LoraGAConfig, "lora_ga_config")
        if self.lora_ga_config is not None and init != "lora_ga":
            warnings.warn("lora_ga_config is ignored unless init_lora_weights='lora_ga'.", PeftWarning, stacklevel=4)
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError("init_lora_weights='loftq' needs loftq_config, e.g. LoftQConfig(loftq_bits=4)")
            loftq = _sub_config(self.loftq_config, LoftQConfig, "loftq_config")
            self.loftq_config = dataclasses.asdict(loftq)  # HF PEFT stores it as a plain dict
        elif self.loftq_config:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'; it was reset to {}.", PeftWarning,
                          stacklevel=4)
            self.loftq_config = {}
        for name, wanted, cls in (("eva_config", "eva", EvaConfig), ("corda_config", "corda", CordaConfig)):
            if init == wanted and getattr(self, name) is None:
                warnings.warn(f"init_lora_weights={wanted!r} without {name}: using the default {cls.__name__}().",
                              PeftWarning, stacklevel=4)
                setattr(self, name, cls())
            elif init != wanted and getattr(self, name) is not None:
                warnings.warn(f"{name} is ignored unless init_lora_weights={wanted!r}.", PeftWarning, stacklevel=4)

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        r = (
            self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), target_name), self.r)
            if self.rank_pattern else self.r
        )
        alpha = (
            self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), target_name), self.lora_alpha)
            if self.alpha_pattern else self.lora_alpha
        )
        if self.use_bdlora is None:
            return {"r": r, "lora_alpha": alpha}
        return {"r": r, "lora_alpha": alpha, "bdlora_side": self.use_bdlora.side(target_name)}

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r
