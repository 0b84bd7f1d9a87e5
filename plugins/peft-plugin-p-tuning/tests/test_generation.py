"""P-tuning generates exactly: cached logits equal a full forward at every step (the kernel's
exact-generation kit, on a tiny Llama and a tiny T5)."""

import pytest

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.generation import GenerationConformance
from peft_plugin_p_tuning import PromptEncoderConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestPTuningGeneration(GenerationConformance):
    causal_lm_fn = staticmethod(M.llama)
    seq2seq_lm_fn = staticmethod(M.t5)
    config_fn = staticmethod(lambda task_type: PromptEncoderConfig(task_type=task_type, num_virtual_tokens=4,
                                                                   encoder_hidden_size=16))
