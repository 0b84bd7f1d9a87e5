"""``PromptEncoderConfig``: HF PEFT's fields and defaults, so configs load both ways."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from peft_kernel import PromptLearningConfig


class PromptEncoderReparameterizationType(str, enum.Enum):
    """The network that turns the learned embeddings into virtual tokens."""

    MLP = "MLP"  #: three linear layers with ReLU between them
    LSTM = "LSTM"  #: a bidirectional LSTM followed by a two-layer MLP

    def __str__(self) -> str:
        return self.value


#: the MLP always has this many hidden layers; encoder_num_layers only sizes the LSTM
MLP_HIDDEN_LAYERS = 2


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual tokens computed by a trainable prompt encoder from learned
    embeddings; the model itself stays frozen."""

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = field(
        default=PromptEncoderReparameterizationType.MLP, metadata={"help": "MLP or LSTM."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the prompt encoder (default: token_dim)."}
    )
    encoder_num_layers: int = field(
        default=MLP_HIDDEN_LAYERS, metadata={"help": "Layers of the LSTM (the MLP always has two hidden layers)."}
    )
    encoder_dropout: float = field(default=0.0, metadata={"help": "Dropout between the LSTM's layers."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "P_TUNING"
        try:
            self.encoder_reparameterization_type = PromptEncoderReparameterizationType(
                self.encoder_reparameterization_type)
        except ValueError:
            choices = ", ".join(m.value for m in PromptEncoderReparameterizationType)
            raise ValueError(f"encoder_reparameterization_type must be one of {choices}, "
                             f"got {self.encoder_reparameterization_type!r}") from None
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ValueError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")

    def fill_derived_fields(self) -> None:
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = self.token_dim
