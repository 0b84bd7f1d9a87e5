"""``peft.tuners.tuners_utils``: where transformers, TRL and diffusers import the base classes from."""

from peft_kernel import BaseTuner
from peft_kernel import BaseTunerLayer as BaseTunerLayer

__all__ = ["BaseTuner", "BaseTunerLayer"]
