"""CPT on the kernel's training-path kit: inputs given as embeddings (same output and CPT loss)
and gradient checkpointing, on a tiny Llama."""

import pytest

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.prompt_training import PromptTrainingConformance
from peft_plugin_cpt import CPTConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestCPTTraining(PromptTrainingConformance):
    causal_lm_fn = staticmethod(M.llama)
    config_fn = staticmethod(lambda task_type: CPTConfig(
        task_type=task_type, cpt_token_ids=[5, 6, 7, 8, 9], cpt_tokens_type_mask=[1, 2, 3, 4, 0],
        opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5, opt_projection_epsilon=5.0,
        opt_projection_format_epsilon=5.0))
