"""Prefix tuning runs the kernel's conformance kit on every task type it supports."""

import pytest
import torch

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_prefix_tuning import PrefixTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::peft_kernel.PeftWarning")


def config(**kw):
    return lambda: PrefixTuningConfig(num_virtual_tokens=3, **kw)


MASK = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])


class TestPrefixTuningConformance(MethodConformance):
    identity_at_init = False  # prefixes change every output from the start
    supports_merge = False  # nothing to fold into weights
    cases = [
        Case("causal-lm-gqa", M.llama, config(task_type="CAUSAL_LM"),
             lambda: {"input_ids": M.ids(), "attention_mask": MASK}),
        Case("causal-lm-projection", M.llama, config(task_type="CAUSAL_LM", prefix_projection=True), lambda: M.ids()),
        Case("seq2seq-lm", M.t5, config(task_type="SEQ_2_SEQ_LM"),
             lambda: {"input_ids": M.ids(), "decoder_input_ids": M.ids(length=3, seed=1)}),
        Case("seq-cls", M.bert_cls, config(task_type="SEQ_CLS"),
             lambda: {"input_ids": M.ids(), "attention_mask": MASK}),
        Case("question-answering", M.bert_qa, config(task_type="QUESTION_ANS"), lambda: M.ids()),
        Case("feature-extraction", M.bert, config(task_type="FEATURE_EXTRACTION"), lambda: M.ids()),
    ]
