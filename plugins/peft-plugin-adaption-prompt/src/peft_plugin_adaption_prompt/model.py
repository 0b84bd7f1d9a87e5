"""``AdaptionPromptModel``: the adaption-prompt tuner. Injection and bookkeeping are the
kernel's; this adds the model-type defaults and HF PEFT's rule for which attention modules
an adapter takes (the last ``adapter_layers`` of those named ``target_modules``)."""

from __future__ import annotations

import copy

from peft_kernel import BaseTuner

from .layer import AdaptedAttention

#: attribute name of the attention modules per transformers model type (HF PEFT knows
#: llama, mistral and gpt2; the others are built the same way)
DEFAULT_TARGETS = {
    "llama": "self_attn",
    "mistral": "self_attn",
    "mixtral": "self_attn",
    "qwen2": "self_attn",
    "gpt2": "attn",
}


class AdaptionPromptModel(BaseTuner):
    prefix = "adaption_"
    layer_cls = AdaptedAttention
    compress_targets = False
    supported_layer_types = (
        "attention with q_proj/k_proj/v_proj/o_proj and rotary position_embeddings (Llama, Mistral, Qwen2, ...)",
        "GPT-2 attention (fused c_attn)",
    )

    def _prepare_adapter_config(self, config, model_config: dict):
        if config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in DEFAULT_TARGETS:
                raise ValueError(
                    f"No default attention modules for model type {model_type!r}; pass the attribute name of the "
                    f"attention modules, e.g. AdaptionPromptConfig(target_modules='self_attn', ...). Defaults exist "
                    f"for: {', '.join(sorted(DEFAULT_TARGETS))}."
                )
            config = copy.copy(config)
            config.target_modules = DEFAULT_TARGETS[model_type]
        return config

    def _select_targets(self, config, module_names: list[str]) -> set[str] | None:
        if not isinstance(config.target_modules, str):
            return None  # module names taken from a state dict: the kernel's suffix match
        suffix = "." + config.target_modules
        candidates = [name for name in module_names if name.endswith(suffix)]
        if len(candidates) < config.adapter_layers:
            raise ValueError(
                f"adapter_layers={config.adapter_layers}, but the model has {len(candidates)} modules named "
                f"{config.target_modules!r}; lower adapter_layers or set target_modules to the attribute name of the "
                "attention modules"
            )
        return set(candidates[-config.adapter_layers:])
