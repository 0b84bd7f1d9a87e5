"""``IA3Config``: HF PEFT's field set and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from peft_kernel import TunerConfig


def _as_set(value):
    return set(value) if isinstance(value, (list, tuple, set, frozenset)) else value


@dataclass
class IA3Config(TunerConfig):
    """(IA)³: every adapted layer gets one learned vector ``l``.

    * ordinary layers: ``y = l ⊙ base(x)`` (one entry per output feature / channel);
    * layers in ``feedforward_modules``: ``y = base(l ⊙ x)`` (one entry per input feature).

    ``feedforward_modules`` must name a subset of ``target_modules``. Both default to a
    table per transformers model type when left ``None``.
    """

    # HF PEFT's IA3Config has no layer selection by index; keep the kernel's fields out of
    # the constructor and out of adapter_config.json so files stay identical.
    layers_to_transform: list[int] | int | None = field(
        default=None, init=False, repr=False, metadata={"runtime_only": True}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, init=False, repr=False, metadata={"runtime_only": True}
    )
    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Targets whose *input* is scaled (names, suffix match, or a regex); a subset of "
                          "target_modules. None: the model type's default."},
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True when the base stores weight as (in, out), e.g. GPT-2 Conv1D."}
    )
    init_ia3_weights: bool = field(
        default=True, metadata={"help": "Start every vector at 1 (identity). False leaves them random (tests only)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "IA3"
        self.feedforward_modules = _as_set(self.feedforward_modules)
        self.check_feedforward_subset()

    def check_feedforward_subset(self) -> None:
        """Raise unless every ``feedforward_modules`` entry is also a ``target_modules`` entry
        (only checkable when both are name lists)."""
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, set) and isinstance(targets, set) and not ff <= targets:
            extra = sorted(ff - targets)
            raise ValueError(
                f"`feedforward_modules` should be a subset of `target_modules`; {extra} are feedforward modules "
                f"but not targets ({sorted(targets)}). Add them to target_modules or drop them."
            )

    def is_feedforward(self, module_name: str) -> bool:
        """Whether the adapted module ``module_name`` scales its input.

        A string is a regex matched against the full name; a list entry matches when the
        name ends with it (plain suffix, exactly as HF PEFT decides it, so vector shapes
        agree for every checkpoint).
        """
        ff = self.feedforward_modules
        if not ff:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(entry) for entry in ff)

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        return {"is_feedforward": self.is_feedforward(target_name)}
