"""``peft.tuners.lora``: LoRA from peft-plugin-lora."""

from peft_plugin_lora import LoraConfig, LoraLayer, LoraModel

__all__ = ["LoraConfig", "LoraLayer", "LoraModel"]
