"""Virtual-token machinery shared by every prompt-learning method.

A prompt-learning method registers a config whose class attribute
``is_prompt_learning`` is true and, as ``model_cls``, a prompt encoder: an ``nn.Module``
built as ``model_cls(config, word_embeddings)`` that maps virtual-token indices to
embeddings. Everything else (inserting the virtual tokens into the model's inputs,
attention masks, labels, ``generate``, several adapters, checkpoint keys) lives here.
"""

from __future__ import annotations

from contextlib import contextmanager


class PromptLearning:
    """Attached to a :class:`~peft_kernel.PeftModel` whose method is prompt learning."""

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model

    def add(self, adapter_name, config) -> None:
        raise NotImplementedError("prompt learning methods are not supported yet")

    def delete(self, adapter_name) -> None:
        raise NotImplementedError

    def freeze(self, adapter_name) -> None:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        raise NotImplementedError

    def generate(self, *args, **kwargs):
        raise NotImplementedError

    @contextmanager
    def disabled(self):
        raise NotImplementedError
        yield

    def key_map(self, adapter_name) -> dict[str, str]:
        """``{in-memory key: checkpoint key}`` (checkpoint keys have no prefix)."""
        raise NotImplementedError
