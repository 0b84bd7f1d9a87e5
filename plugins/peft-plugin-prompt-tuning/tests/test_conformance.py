"""Prompt tuning runs the kernel's conformance kit on every task type it supports."""

import _pt_models as M
import pytest
import torch

from peft_kernel.testing import Case, MethodConformance
from peft_plugin_prompt_tuning import PromptTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::peft_kernel.PeftWarning")


def config(**kw):
    return lambda: PromptTuningConfig(num_virtual_tokens=4, **kw)


class TestPromptTuningConformance(MethodConformance):
    identity_at_init = False  # virtual tokens change every output from the start
    supports_merge = False  # nothing to fold into weights
    cases = [
        Case("causal-lm", M.llama, config(task_type="CAUSAL_LM"), lambda: M.ids()),
        Case("causal-lm-sample-vocab", M.llama, config(task_type="CAUSAL_LM", prompt_tuning_init="SAMPLE_VOCAB"),
             lambda: {"input_ids": M.ids(), "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])}),
        Case("seq2seq-lm", M.t5, config(task_type="SEQ_2_SEQ_LM"),
             lambda: {"input_ids": M.ids(), "decoder_input_ids": M.ids(length=3, seed=1)}),
        Case("seq-cls", M.bert_cls, config(task_type="SEQ_CLS"),
             lambda: {"input_ids": M.ids(), "token_type_ids": torch.ones(2, 6, dtype=torch.long)}),
        Case("token-cls", M.bert_token_cls, config(task_type="TOKEN_CLS"), lambda: M.ids()),
        Case("feature-extraction", M.bert, config(task_type="FEATURE_EXTRACTION"), lambda: M.ids()),
        Case("plain-module", M.TinyEncoder, config(token_dim=16), lambda: M.ids()),
    ]
