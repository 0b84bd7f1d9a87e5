"""CPT generates exactly: cached logits equal a full forward at every step (the kernel's
exact-generation kit on a tiny Llama; CPT is for causal LMs only)."""

import pytest

from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.generation import GenerationConformance
from peft_plugin_cpt import CPTConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")


class TestCPTGeneration(GenerationConformance):
    causal_lm_fn = staticmethod(M.llama)
    config_fn = staticmethod(lambda task_type: CPTConfig(task_type=task_type, cpt_token_ids=[5, 6, 7, 8],
                                                         cpt_tokens_type_mask=[1, 2, 3, 4]))
