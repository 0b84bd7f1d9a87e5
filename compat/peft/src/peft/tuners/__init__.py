"""``peft.tuners``: the adapter-layer and tuner base classes, and per-method subpackages."""

from peft_kernel import BaseTuner
from peft_kernel import BaseTunerLayer as BaseTunerLayer

__all__ = ["BaseTuner", "BaseTunerLayer"]
