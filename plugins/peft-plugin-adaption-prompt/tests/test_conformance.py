"""The kernel's conformance kit, run against the adaption-prompt plugin (merging is refused)."""

from __future__ import annotations

import _ap_models as AP
import pytest

from peft_kernel.testing import Case, MethodConformance
from peft_plugin_adaption_prompt import AdaptionPromptConfig

pytest.importorskip("transformers")
pytestmark = [pytest.mark.conformance, pytest.mark.filterwarnings("ignore")]


def _case(model: str, **config):
    return Case(model, model_fn=AP.MODELS[model], input_fn=AP.inputs,
                config_fn=lambda: AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, **config))


class TestAdaptionPromptConformance(MethodConformance):
    supports_merge = False
    cases = [
        _case("llama", adapter_layers=2),
        _case("gpt2", adapter_layers=1),
    ]
