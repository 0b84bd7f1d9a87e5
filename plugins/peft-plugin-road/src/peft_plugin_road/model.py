"""``RoadModel``: the RoAd tuner. Injection and bookkeeping are the kernel's."""

from __future__ import annotations

from peft_kernel import BaseTuner
from peft_kernel.targeting import ATTENTION_TARGETS

from .layer import RoadLayer


class RoadModel(BaseTuner):
    prefix = "road_"
    layer_cls = RoadLayer
    # the kernel builds layer_cls on every linear-like layer and these, in each kind's layout
    dispatch_types = ()
    default_target_modules = ATTENTION_TARGETS
    supported_layer_types = ("torch.nn.Linear", "transformers Conv1D", "quantized linear layers")
