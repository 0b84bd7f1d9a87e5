"""Multitask prompt tuning runs the kernel's conformance kit on every task type it supports
(every call names each row's task)."""

import pytest
import torch

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_multitask_prompt_tuning import MultitaskPromptTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::peft_kernel.PeftWarning")

TASKS = torch.tensor([1, 0])


def config(**kw):
    return lambda: MultitaskPromptTuningConfig(num_virtual_tokens=3, num_tasks=2, num_ranks=2, **kw)


class TestMultitaskPromptTuningConformance(MethodConformance):
    identity_at_init = False  # virtual tokens change every output from the start
    supports_merge = False  # nothing to fold into weights
    cases = [
        Case("causal-lm", M.llama, config(task_type="CAUSAL_LM"), lambda: {"input_ids": M.ids(), "task_ids": TASKS}),
        Case("seq2seq-lm", M.t5, config(task_type="SEQ_2_SEQ_LM"),
             lambda: {"input_ids": M.ids(), "decoder_input_ids": M.ids(length=3, seed=1), "task_ids": TASKS}),
        Case("seq-cls", M.bert_cls, config(task_type="SEQ_CLS"), lambda: {"input_ids": M.ids(), "task_ids": TASKS}),
        Case("token-cls", M.bert_token_cls, config(task_type="TOKEN_CLS"),
             lambda: {"input_ids": M.ids(), "task_ids": TASKS}),
        Case("feature-extraction", M.bert, config(task_type="FEATURE_EXTRACTION"),
             lambda: {"input_ids": M.ids(), "task_ids": TASKS}),
    ]
