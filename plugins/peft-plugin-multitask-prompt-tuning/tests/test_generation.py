"""Multitask prompt tuning generates exactly, each row with its own task: cached logits equal a
full forward at every step (the kernel's exact-generation kit, on a tiny Llama and a tiny T5)."""

import pytest
import torch

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.generation import GenerationConformance
from peft_plugin_multitask_prompt_tuning import MultitaskPromptTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestMultitaskPromptTuningGeneration(GenerationConformance):
    causal_lm_fn = staticmethod(M.llama)
    seq2seq_lm_fn = staticmethod(M.t5)
    config_fn = staticmethod(lambda task_type: MultitaskPromptTuningConfig(
        task_type=task_type, num_virtual_tokens=4, num_tasks=3, num_ranks=2))
    row_inputs_fn = staticmethod(lambda batch: {"task_ids": torch.arange(batch) % 3})
