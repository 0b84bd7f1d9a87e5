"""Prompt tuning runs the kernel's conformance kit on every task type it supports."""

import pytest
import torch
from torch import nn

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_prompt_tuning import PromptTuningConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::peft_kernel.PeftWarning")


def config(**kw):
    return lambda: PromptTuningConfig(num_virtual_tokens=4, **kw)


class TinyEncoder(nn.Module):
    """Not a transformers model: embeddings, one mixing layer, a head; accepts inputs_embeds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(M.VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.mix(h))
        h = h + h.mean(dim=1, keepdim=True)  # every position sees every other one
        return self.head(h)


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
        Case("plain-module", TinyEncoder, config(token_dim=16), lambda: M.ids()),
    ]
