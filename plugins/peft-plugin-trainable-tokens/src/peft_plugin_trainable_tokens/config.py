"""``TrainableTokensConfig``: HF PEFT's fields and defaults, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import TunerConfig


def check_token_indices(indices, where: str) -> list[int]:
    """``indices`` as a list of distinct non-negative ints, or a ``ValueError`` naming ``where``."""
    if isinstance(indices, (str, bytes)) or not hasattr(indices, "__iter__"):
        raise ValueError(f"{where} must be a list of token ids (ints), got {type(indices).__name__}")
    indices = list(indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise ValueError(f"{where} must hold non-negative integer token ids; got {bad[:5]}")
    if len(set(indices)) != len(indices):
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise ValueError(f"{where} lists token ids {repeated} more than once; list each id once")
    return indices


@dataclass
class TrainableTokensConfig(TunerConfig):
    """Train the embedding rows of a few tokens (new tokens, or existing ones re-learned) and
    leave every other row of the matrix frozen."""

    # HF PEFT's TrainableTokensConfig has no such fields; they work here and are saved when set
    fields_written_when_set = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")
    # it trains a few rows of a targeted embedding, so saving the adapter does not save the full matrix
    saves_targeted_embeddings = False
    # a head tied to the targeted input embeddings follows their rows (TrainableTokensModel)
    keeps_weight_tying = True

    token_indices: list[int] = field(
        default_factory=list, metadata={"help": "Ids of the tokens whose embedding rows train (from the tokenizer)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the rows start as the current embeddings (the adapter changes nothing until trained). "
                          "False: random rows (tests)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "TRAINABLE_TOKENS"
        self.token_indices = check_token_indices(self.token_indices, "TrainableTokensConfig.token_indices")
