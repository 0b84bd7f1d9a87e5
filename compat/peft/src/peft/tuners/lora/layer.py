"""``peft.tuners.lora.layer``: LoRA's layer classes from peft-plugin-lora."""

from peft_plugin_lora import Conv1d, Conv2d, Conv3d, Embedding, Linear, LoraLayer

__all__ = ["Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "LoraLayer"]
