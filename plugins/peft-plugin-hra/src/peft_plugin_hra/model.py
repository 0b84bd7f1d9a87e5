"""``HRAModel``: the HRA tuner. Injection and bookkeeping are the kernel's."""

from __future__ import annotations

from peft_kernel import BaseTuner
from peft_kernel.targeting import ATTENTION_TARGETS

from .layer import HRALayer


class HRAModel(BaseTuner):
    prefix = "hra_"
    layer_cls = HRALayer
    default_target_modules = ATTENTION_TARGETS
    supported_layer_types = ("torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d",
                             "transformers Conv1D")
