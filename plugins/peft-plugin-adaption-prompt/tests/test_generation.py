"""Adaption prompt generates exactly: at every step the cached logits equal a full forward
without cache (the kernel's exact-generation kit: dynamic and static caches, left-padded
batches, beam search, inputs_embeds), on a grouped-query Llama and on GPT-2."""

from __future__ import annotations

import _ap_models as AP
import pytest

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.generation import GenerationConformance, generation_gap
from peft_plugin_adaption_prompt import AdaptionPromptConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestAdaptionPromptGeneration(GenerationConformance):
    causal_lm_fn = staticmethod(M.llama)
    config_fn = staticmethod(lambda task_type: AdaptionPromptConfig(task_type=task_type, adapter_len=4,
                                                                    adapter_layers=2))


@pytest.mark.parametrize("model", ["gpt2", "qwen2", "llama-wide-heads"])
def test_other_layouts_generate_exactly(model):
    adapted = TestAdaptionPromptGeneration()._adapted(AP.MODELS[model], "CAUSAL_LM")
    ids = M.ids()
    mask = ids.new_ones(ids.shape)
    mask[0, :2] = 0
    assert generation_gap(adapted, ids, mask) <= 1e-4
