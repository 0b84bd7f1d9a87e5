"""``peft.tuners.lora.config``."""

from peft_plugin_lora import LoraConfig

__all__ = ["LoraConfig"]
