"""``PromptTuningConfig``: HF PEFT's fields and defaults, so configs load both ways."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft_kernel import PromptLearningConfig


class PromptTuningInit(str, enum.Enum):
    """How the virtual-token embeddings start out."""

    TEXT = "TEXT"  #: embeddings of the tokens of ``prompt_tuning_init_text`` (repeated / cut to length)
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  #: embeddings of randomly drawn vocabulary tokens
    RANDOM = "RANDOM"  #: standard normal vectors (may lie far from the word-embedding manifold)

    def __str__(self) -> str:
        return self.value


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable embeddings placed in front of the
    input; the model itself stays frozen."""

    prompt_tuning_init: PromptTuningInit | str = field(
        default=PromptTuningInit.RANDOM, metadata={"help": "RANDOM, TEXT or SAMPLE_VOCAB."}
    )
    prompt_tuning_init_text: str | None = field(
        default=None, metadata={"help": "Text whose token embeddings start the prompt (TEXT only)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer for prompt_tuning_init_text (TEXT only)."}
    )
    tokenizer_kwargs: dict | None = field(
        default=None, metadata={"help": "Keyword arguments for AutoTokenizer.from_pretrained (TEXT only)."}
    )

    #: the values prompt_tuning_init accepts (a subclass may accept others)
    init_choices = PromptTuningInit

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "PROMPT_TUNING"
        try:
            self.prompt_tuning_init = self.init_choices(self.prompt_tuning_init)
        except ValueError:
            choices = ", ".join(m.value for m in self.init_choices)
            raise ValueError(f"prompt_tuning_init must be one of {choices}, got {self.prompt_tuning_init!r}") from None
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ValueError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (the tokenizer of the base model)")
        if text and self.prompt_tuning_init_text is None:
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and not text:
            raise ValueError("tokenizer_kwargs are only used with prompt_tuning_init='TEXT'")
