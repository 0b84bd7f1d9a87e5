"""TrainableTokens passes the kernel's conformance kit on an embedding, and ``peft-kernel finetune
--method trainable_tokens`` trains."""

from peft_kernel.testing import Case, MethodConformance
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.cli import FinetuneSuite
from peft_plugin_trainable_tokens import TrainableTokensConfig


class TestTrainableTokensConformance(MethodConformance):
    cases = [Case("emb", lambda: M.build("embedding"), lambda: TrainableTokensConfig(target_modules=["emb"],
                                                                                token_indices=[1, 3, 5, 7]),
                  lambda: M.inputs("embedding"))]


class TestTrainableTokensCommandLine(FinetuneSuite):
    method, distribution = "trainable_tokens", "peft-plugin-trainable-tokens"
    finetune_args = ("--option", f"token_indices={list(range(259))}", "--lr", "0.2")  # every byte token
