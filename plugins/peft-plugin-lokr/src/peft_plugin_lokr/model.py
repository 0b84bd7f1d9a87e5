"""``LoKrModel``: the LoKr tuner. Injection and bookkeeping are the kernel's."""

from __future__ import annotations

from torch import nn

from peft_kernel import BaseTuner
from peft_kernel.targeting import ATTENTION_TARGETS

from .layer import LoKrLayer


class LoKrModel(BaseTuner):
    prefix = "lokr_"
    layer_cls = LoKrLayer
    # the kernel builds layer_cls on every linear-like layer and these, in each kind's layout
    dispatch_types = (nn.Conv1d, nn.Conv2d)
    default_target_modules = ATTENTION_TARGETS
    supported_layer_types = ("torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "transformers Conv1D")
