"""``MissModel``: the MiSS tuner. Injection and bookkeeping are the kernel's."""

from __future__ import annotations

from peft_kernel import BaseTuner
from peft_kernel.targeting import ATTENTION_TARGETS

from .layer import MissLayer


class MissModel(BaseTuner):
    prefix = "miss_"
    layer_cls = MissLayer
    default_target_modules = ATTENTION_TARGETS
    supported_layer_types = ("torch.nn.Linear", "transformers Conv1D", "quantized linear layers")
