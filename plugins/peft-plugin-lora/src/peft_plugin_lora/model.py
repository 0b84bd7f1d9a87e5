"""``LoraModel``: the LoRA tuner. All injection and bookkeeping is the kernel's."""

from __future__ import annotations

from peft_kernel import BaseTuner

from .layer import LoraLayer

#: default targets per transformers model type, used when target_modules is None
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"], "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"], "falcon": ["query_key_value"], "t5": ["q", "v"], "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "distilbert": ["q_lin", "v_lin"],
}


class LoraModel(BaseTuner):
    prefix = "lora_"
    layer_cls = LoraLayer
    default_target_modules = DEFAULT_TARGETS
    supported_layer_types = (
        "torch.nn.Linear", "torch.nn.Embedding", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d",
        "torch.nn.MultiheadAttention", "transformers Conv1D",
    )

    def _set_layers(self, method: str, *args) -> None:
        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                getattr(module, method)(*args)

    def set_scale(self, adapter: str, scale: float) -> None:
        self._set_layers("set_scale", adapter, scale)

    def scale_layer(self, scale: float) -> None:
        self._set_layers("scale_layer", scale)

    def unscale_layer(self, scale=None) -> None:
        self._set_layers("unscale_layer", scale)
