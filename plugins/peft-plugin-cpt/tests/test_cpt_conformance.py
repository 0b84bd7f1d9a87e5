"""CPT runs the kernel's conformance kit (causal LMs, the only task type CPT supports)."""

import pytest
import torch

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_plugin_cpt import CPTConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::peft_kernel.PeftWarning")


def config(**kw):
    # wide projection bounds, so that perturbed corrections are not projected away to nothing
    return lambda: CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[5, 6, 7, 8], cpt_tokens_type_mask=[1, 2, 3, 4],
                             opt_projection_epsilon=5.0, opt_projection_format_epsilon=5.0, **kw)


class TestCPTConformance(MethodConformance):
    identity_at_init = False  # the prompt changes every output from the start
    supports_merge = False  # nothing to fold into weights
    cases = [
        Case("causal-lm", M.llama, config(), lambda: {"input_ids": M.ids(),
                                                      "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])}),
        Case("causal-lm-decay", M.llama, config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5),
             lambda: M.ids()),
    ]
