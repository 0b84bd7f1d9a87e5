"""``AdaptionPromptConfig``: HF PEFT's field set, so ``adapter_config.json`` files load both ways."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft_kernel import TunerConfig


def _runtime_only():
    """A TunerConfig field that HF PEFT's AdaptionPromptConfig lacks: kept out of the
    constructor and out of adapter_config.json, so files stay identical."""
    return field(default=None, init=False, repr=False, metadata={"runtime_only": True})


@dataclass
class AdaptionPromptConfig(TunerConfig):
    """Adaption prompt (LLaMA-Adapter): ``adapter_len`` trainable prompt vectors in each of the
    last ``adapter_layers`` attention modules, attended to through a zero-initialised gate.

    ``target_modules`` is the *attribute name* of the attention modules (``"self_attn"`` in
    Llama, ``"attn"`` in GPT-2): every module whose name ends in ``"." + target_modules`` is a
    candidate, and the last ``adapter_layers`` of them, in model order, are adapted. Left
    ``None``, it comes from a table per transformers model type.
    """

    target_modules: str | list[str] | None = field(  # a one-name list is accepted and stored as the name
        default=None,
        metadata={"help": "Attribute name of the attention modules to adapt, e.g. 'self_attn'. None: the model "
                          "type's default."},
    )
    adapter_len: int = field(default=None, metadata={"help": "Number of prompt vectors per adapted attention module."})
    adapter_layers: int = field(
        default=None, metadata={"help": "Number of attention modules to adapt, counted from the last one."}
    )
    exclude_modules: list[str] | str | None = _runtime_only()
    layers_to_transform: list[int] | int | None = _runtime_only()
    layers_pattern: list[str] | str | None = _runtime_only()
    # a task head (SEQ_CLS, ...) is still trained and saved: the task class puts it here at run time
    modules_to_save: list[str] | None = _runtime_only()

    is_adaption_prompt = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = "ADAPTION_PROMPT"
        targets = self.target_modules
        if isinstance(targets, set) and len(targets) == 1:  # a one-name list, e.g. from the command line
            self.target_modules = targets = next(iter(targets))
        if targets is not None and not isinstance(targets, str):
            raise ValueError(
                f"target_modules of an adaption prompt is one attribute name such as 'self_attn', got {targets!r}"
            )
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{name} must be a positive integer, got {value!r}; e.g. "
                    "AdaptionPromptConfig(adapter_len=10, adapter_layers=2) (on the command line: "
                    "--option adapter_len=10 --option adapter_layers=2)"
                )
