"""Prompt tuning generates exactly: cached logits equal a full forward at every step
(the kernel's exact-generation kit, on a tiny Llama and a tiny T5)."""

import pytest

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.generation import GenerationConformance
from peft_plugin_prompt_tuning import PromptTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestPromptTuningGeneration(GenerationConformance):
    causal_lm_fn = staticmethod(M.llama)
    seq2seq_lm_fn = staticmethod(M.t5)
    config_fn = staticmethod(lambda task_type: PromptTuningConfig(task_type=task_type, num_virtual_tokens=4))
