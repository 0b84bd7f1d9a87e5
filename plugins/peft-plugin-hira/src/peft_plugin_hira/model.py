"""``HiraModel``: the HiRA tuner. Injection and bookkeeping are the kernel's."""

from __future__ import annotations

from peft_kernel import BaseTuner
from peft_kernel.targeting import ATTENTION_TARGETS

from .layer import HiraLayer


class HiraModel(BaseTuner):
    prefix = "hira_"
    layer_cls = HiraLayer
    default_target_modules = ATTENTION_TARGETS
    supported_layer_types = ("torch.nn.Linear", "torch.nn.Conv1d/2d/3d", "torch.nn.Embedding", "transformers Conv1D")
