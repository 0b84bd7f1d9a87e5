"""Multitask prompt tuning on the kernel's training-path kit: inputs given as embeddings,
gradient checkpointing (on Llama and T5), a classification head in modules_to_save."""

import pytest
import torch

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.prompt_training import PromptTrainingConformance
from peft_plugin_multitask_prompt_tuning import MultitaskPromptTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestMultitaskPromptTuningTraining(PromptTrainingConformance):
    causal_lm_fn = staticmethod(M.llama)
    seq2seq_lm_fn = staticmethod(M.t5)
    seq_cls_fn = staticmethod(M.bert_cls)
    config_fn = staticmethod(lambda task_type: MultitaskPromptTuningConfig(
        task_type=task_type, num_virtual_tokens=3, num_tasks=2, num_ranks=2))
    row_inputs_fn = staticmethod(lambda batch: {"task_ids": torch.arange(batch) % 2})
