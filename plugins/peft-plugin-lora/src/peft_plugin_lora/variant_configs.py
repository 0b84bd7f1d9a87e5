"""Sub-configs of the LoRA variants in ``variants/`` (KaSA, BD-LoRA, VeLoRA, MonteCLoRA):
plain dataclasses with HF PEFT's fields and defaults, so ``adapter_config.json`` files move
both ways. Torch-free (imported by the entry-point module through ``config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
