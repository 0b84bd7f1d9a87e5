"""``peft.utils.transformers_weight_conversion``: the key renamings transformers' ``load_adapter``
applies to an adapter checkpoint (``base_model.model.<path>.<prefix>A.weight`` on disk,
``<path>.<prefix>A.<adapter name>.weight`` in the model)."""

from __future__ import annotations

import re

from peft_kernel.plugins import manager


def build_peft_weight_mapping(weight_conversions: list | None, adapter_name: str, peft_config=None) -> list:
    """The renamings for ``adapter_name``, followed by the model's own key renamings. The
    model's weight *converters* (fused expert layers) are left out: adapters on fused layers are
    not supported here."""
    from transformers.core_model_loading import WeightRenaming

    if peft_config is not None:
        prefixes = {manager().method(peft_config.peft_type).prefix}
    else:
        prefixes = {spec.prefix for spec in manager().methods().values()}
    renamings = [WeightRenaming(source_patterns=r"base_model\.model\.", target_patterns="")]
    for prefix in sorted(p for p in prefixes if p):
        renamings.append(WeightRenaming(source_patterns=rf"({re.escape(prefix)}[^.]*)",
                                        target_patterns=rf"\1.{adapter_name}"))
    return renamings + [c for c in weight_conversions or () if isinstance(c, WeightRenaming)]


__all__ = ["build_peft_weight_mapping"]
