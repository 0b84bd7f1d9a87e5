"""Sub-configs of the LoRA variants in ``variants/`` (KaSA, BD-LoRA, VeLoRA, MonteCLoRA):
plain dataclasses with HF PEFT's fields and defaults, so ``adapter_config.json`` files move
both ways. Torch-free (imported by the entry-point module through ``config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class KasaConfig:
    """KaSA (``kasa_config``): the base weight loses its ``r`` smallest singular components
    once, when the adapter is added, and the update is ``s · B diag(d) A`` with a trainable
    ``d`` (``lora_diag``). ``beta`` and ``gamma`` weigh the two regularisers of
    ``LoraModel._get_kasa_loss``, which the training loop adds to its loss."""

    beta: float = field(default=1e-4, metadata={"help": "Weight of sum(d²) in the KaSA loss."})
    gamma: float = field(default=1e-3, metadata={"help": "Weight of ‖BᵀB − I‖_F + ‖AAᵀ − I‖_F in the KaSA loss."})

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"KasaConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class BdLoraConfig:
    """BD-LoRA (``use_bdlora``): in the targets whose name contains a pattern of
    ``target_modules_bd_a`` the A factor is block-diagonal (``nblocks`` blocks), in those of
    ``target_modules_bd_b`` the B factor. A row-sharded layer (attention output, MLP down
    projection) wants A block-diagonal, a column-sharded one (q/k/v, up, gate) B; with
    ``nblocks`` equal to the tensor-parallel degree, serving needs no extra communication.
    ``match_strict``: every target must match one of the lists."""

    target_modules_bd_a: list[str] | None = field(
        default=None, metadata={"help": "Name fragments of the targets whose A factor is block-diagonal."}
    )
    target_modules_bd_b: list[str] | None = field(
        default=None, metadata={"help": "Name fragments of the targets whose B factor is block-diagonal."}
    )
    nblocks: int = field(default=1, metadata={"help": "Blocks per block-diagonal factor (the sharding degree)."})
    match_strict: bool = field(default=True, metadata={"help": "Every target must match one of the two lists."})

    def __post_init__(self) -> None:
        if not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ValueError(f"BdLoraConfig.nblocks must be a positive integer, got {self.nblocks!r}")
        both = set(self.target_modules_bd_a or ()) & set(self.target_modules_bd_b or ())
        if both:
            raise ValueError(f"BdLoraConfig: {sorted(both)} are in both target_modules_bd_a and target_modules_bd_b; "
                             "a layer has one block-diagonal factor, A or B")

    def side(self, target_name: str) -> str | None:
        """``"A"`` or ``"B"``: the factor that is block-diagonal in the module ``target_name``
        (``None``: neither, allowed only without ``match_strict``)."""
        in_a = any(p in target_name for p in self.target_modules_bd_a or ())
        in_b = any(p in target_name for p in self.target_modules_bd_b or ())
        if in_a and in_b:
            raise ValueError(f"BD-LoRA: {target_name!r} matches both target_modules_bd_a and target_modules_bd_b; "
                             "make the patterns distinct")
        if not (in_a or in_b) and self.match_strict:
            raise ValueError(f"BD-LoRA: {target_name!r} matches neither target_modules_bd_a nor target_modules_bd_b; "
                             "add a pattern for it, leave it out of target_modules, or set match_strict=False "
                             "to give it a plain LoRA")
        return "A" if in_a else "B" if in_b else None


@dataclass
class VeloraConfig:
    """VeLoRA (``velora_config``): in training, A's backward uses the input compressed to one
    number per group of ``⌈in / num_groups⌉`` features (its projection on a unit vector,
    ``lora_velora_embed``), so the full input need not be kept for backward. The forward and
    the merged weight are plain LoRA. ``init_type``: the vector is the normalised mean
    sub-token of every training batch (``"batch_average"``), of the first one
    (``"batch_average_once"``), or random (``"random"``)."""

    num_groups: int = field(default=64, metadata={"help": "Groups the input features are split into."})
    scale: float = field(default=1.0, metadata={"help": "Factor on the reconstructed input in backward."})
    init_type: Literal["batch_average", "batch_average_once", "random"] = field(
        default="batch_average", metadata={"help": "'batch_average', 'batch_average_once' or 'random'."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.num_groups, int) or self.num_groups <= 0:
            raise ValueError(f"VeloraConfig.num_groups must be a positive integer, got {self.num_groups!r}")
        if self.scale <= 0:
            raise ValueError(f"VeloraConfig.scale must be > 0, got {self.scale!r}")
        if self.init_type not in ("batch_average", "batch_average_once", "random"):
            raise ValueError("VeloraConfig.init_type must be 'batch_average', 'batch_average_once' or 'random', got "
                             f"{self.init_type!r}")


@dataclass
class MontecloraConfig:
    """MonteCLoRA (``monteclora_config``): in training, A is replaced by a mixture of
    ``num_samples`` noisy copies of itself (noise covariance drawn from a learned Wishart,
    mixture weights from a learned Dirichlet); outside training it is plain LoRA.
    ``LoraModel._get_monteclora_loss`` gives the variational (KL and entropy) loss."""

    num_samples: int = field(default=8, metadata={"help": "Noisy copies of A mixed per training forward."})
    use_entropy: bool = field(default=False, metadata={"help": "Add the mixture weights' sum of squares to the loss."})
    dirichlet_prior: float = field(default=0.1, metadata={"help": "Concentration of the Dirichlet prior (> 0)."})
    sample_scaler: float = field(default=1e-4, metadata={"help": "Factor on the noise added to A."})
    kl_loss_weight: float = field(default=1e-5, metadata={"help": "Weight of the KL terms in the loss."})
    buffer_size: int = field(default=150, metadata={"help": "Noise draws made at a time (then used one per step)."})

    def __post_init__(self) -> None:
        for name in ("num_samples", "buffer_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MontecloraConfig.{name} must be a positive integer, got {value!r}")
        if self.dirichlet_prior <= 0:
            raise ValueError(f"MontecloraConfig.dirichlet_prior must be > 0, got {self.dirichlet_prior!r}")
