"""``HiraModel``: the HiRA tuner. Injection and bookkeeping are the kernel's."""

from __future__ import annotations

from torch import nn

from peft_kernel import BaseTuner
from peft_kernel.targeting import ATTENTION_TARGETS

from .layer import HiraLayer


class HiraModel(BaseTuner):
    prefix = "hira_"
    layer_cls = HiraLayer
    # the kernel builds layer_cls on every linear-like layer and these, in each kind's layout
    dispatch_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
    default_target_modules = ATTENTION_TARGETS
    supported_layer_types = ("torch.nn.Linear", "torch.nn.Conv1d/2d/3d", "torch.nn.Embedding", "transformers Conv1D")
