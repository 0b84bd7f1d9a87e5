"""P-tuning runs the kernel's conformance kit on every task type it supports, with both
prompt encoders."""

import pytest
import torch

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_p_tuning import PromptEncoderConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::peft_kernel.PeftWarning")


def config(**kw):
    return lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8, **kw)


MASK = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])


class TestPTuningConformance(MethodConformance):
    identity_at_init = False  # virtual tokens change every output from the start
    supports_merge = False  # nothing to fold into weights
    cases = [
        Case("causal-lm-mlp", M.llama, config(task_type="CAUSAL_LM"),
             lambda: {"input_ids": M.ids(), "attention_mask": MASK}),
        Case("causal-lm-lstm", M.llama, config(task_type="CAUSAL_LM", encoder_reparameterization_type="LSTM"),
             lambda: M.ids()),
        Case("seq2seq-lm", M.t5, config(task_type="SEQ_2_SEQ_LM"),
             lambda: {"input_ids": M.ids(), "decoder_input_ids": M.ids(length=3, seed=1)}),
        Case("seq-cls", M.bert_cls, config(task_type="SEQ_CLS"),
             lambda: {"input_ids": M.ids(), "attention_mask": MASK}),
        Case("token-cls", M.bert_token_cls, config(task_type="TOKEN_CLS"), lambda: M.ids()),
        Case("question-answering", M.bert_qa, config(task_type="QUESTION_ANS"), lambda: M.ids()),
        Case("feature-extraction", M.bert, config(task_type="FEATURE_EXTRACTION"), lambda: M.ids()),
    ]
