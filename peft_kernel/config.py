"""Adapter configurations: the base every method config builds on.

A config is a dataclass; its fields are exactly what ``adapter_config.json`` holds, so a
file written here loads in HF PEFT and the reverse. ``peft_type`` strings are resolved to
config classes through the plugin registry only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import PeftWarning
from .io import atomic_write_text

CONFIG_NAME = "adapter_config.json"
#: checkpoint format we write; peft_version records it together with our own version
PEFT_FORMAT_VERSION = "0.21.2"


def _kernel_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("peft-kernel")
    except metadata.PackageNotFoundError:
        return "UNKNOWN"


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


@dataclass
class PeftConfig:
    """Fields common to every adapter. Subclass it (usually via :class:`TunerConfig`)
    and set ``peft_type`` in ``__post_init__`` after calling ``super().__post_init__()``."""

    task_type: str | TaskType | None = field(default=None, metadata={"help": "Task type, e.g. CAUSAL_LM."})
    peft_type: str | None = field(default=None, metadata={"help": "Method id (the registered name, upper-case)."})
    auto_mapping: dict | None = field(default=None, metadata={"help": "Base model class for AutoPeftModel."})
    peft_version: str | None = field(default=None, metadata={"help": "Filled in automatically."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model id or path."})
    revision: str | None = field(default=None, metadata={"help": "Base model revision."})
    inference_mode: bool = field(default=False, metadata={"help": "Freeze the adapter."})

    is_prompt_learning = False
    is_adaption_prompt = False
    #: fields that HF PEFT's config of this method lacks (e.g. inherited target-matching
    #: fields it does not offer): written to ``adapter_config.json`` only when they differ
    #: from their default, so that the files stay identical to HF PEFT's
    fields_written_when_set: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.peft_version is None:
            self.peft_version = f"{PEFT_FORMAT_VERSION}+peftkernel.{_kernel_version()}"
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise ValueError(
                f"Invalid task_type {self.task_type!r}; expected one of {', '.join(TaskType.__members__)}."
            )

    # -- serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All dataclass fields (private and runtime-only fields excluded)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_") or f.metadata.get("runtime_only"):
                continue
            value = getattr(self, f.name)
            if f.name in self.fields_written_when_set and value == _default(f):
                continue
            out[f.name] = _jsonable(value)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` into ``save_directory`` (atomically)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory")
        os.makedirs(save_directory, exist_ok=True)
        data = self.to_dict()
        data.update(kwargs.pop("extra", {}) or {})
        atomic_write_text(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_peft_type(cls, **kwargs) -> PeftConfig:
        """Build the config class registered for ``kwargs["peft_type"]``."""
        if "peft_type" not in kwargs:
            raise ValueError("adapter config has no 'peft_type'; it is required to know which method to load")
        from .plugins import manager

        config_cls = manager().method(kwargs["peft_type"]).config_cls
        return config_cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build ``cls`` from a dict, dropping (with a warning) keys this version does not know."""
        if cls in (PeftConfig, TunerConfig, PromptLearningConfig):
            return cls.from_peft_type(**data)
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"Unexpected keys in the {cls.__name__} config were ignored: {', '.join(unknown)}. They probably "
                "come from a newer PEFT version; results may differ if they held non-default values.",
                PeftWarning,
                stacklevel=3,
            )
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str) -> dict[str, Any]:
        with open(path, encoding="utf-8") as fh:
            try:
                return json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); was it written completely?") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load ``adapter_config.json`` from a directory (``subfolder`` inside it)."""
        path = pretrained_model_name_or_path
        if subfolder:
            path = os.path.join(path, subfolder)
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise ValueError(
                f"Can't find {CONFIG_NAME} at {path!r}. peft-kernel loads adapters from local directories; "
                "download hub adapters first (e.g. huggingface_hub.snapshot_download)."
            )
        data = cls.from_json_file(file)
        return cls.from_dict(data)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a sub-config (e.g. of one feature)
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class TunerConfig(PeftConfig):
    """Base for methods that wrap layers of the model: the target-matching fields.

    Matching rules (exactly HF PEFT's): a string ``target_modules`` is a regex that must
    match the full module name; a list matches a name equal to an entry or ending in
    ``"." + entry``; ``"all-linear"`` means every linear layer except the output head.
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (list, suffix match) or a regex (full match) to adapt."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or regex never to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt layers with these indices (list targets only)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer container (e.g. 'layers'), with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a classifier)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._custom_modules = None
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = set(self.target_modules)
        elif isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and (
            self.layers_to_transform is not None or self.layers_pattern is not None
        ):
            raise ValueError(
                "layers_to_transform and layers_pattern cannot be used with a regex target_modules; "
                "put the layer index into the regex instead, or pass target_modules as a list."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform; set both or neither.")

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        """Per-layer keyword arguments for the method's layer constructor (patterns applied)."""
        return {}

    def register_custom_module(self, mapping: dict) -> None:
        """Adapt modules of the given types with custom layers, for this config only:
        ``{module_type: layer_cls}`` (runtime state, never saved; register again before
        loading). Tried before every plugin's layers, like
        :func:`peft_kernel.register_layer_mapping`, which does the same process-wide."""
        if self._custom_modules is None:
            self._custom_modules = {}
        self._custom_modules.update(mapping)

    #: HF PEFT's name for :meth:`register_custom_module`
    _register_custom_module = register_custom_module


@dataclass
class LowRankDeltaConfig(TunerConfig):
    """Base of weight-delta methods built from rank-``r`` factors and scaled by ``alpha / r`` (the
    fields LyCORIS-style methods share, with HF PEFT's names and defaults): ``r`` and ``alpha``, per
    module through ``rank_pattern`` / ``alpha_pattern`` (:meth:`layer_kwargs` gives each layer its
    own), the training-time dropouts of :class:`peft_kernel.WeightDeltaLayer` (``rank_dropout``: its
    row dropout; ``module_dropout``), and ``use_effective_conv2d``, the Tucker-2 ("CP") form of
    convolution kernels (:func:`peft_kernel.delta.tucker_product`). A layer applies the settings
    with :meth:`peft_kernel.WeightDeltaLayer.set_low_rank`."""

    r: int = field(default=8, metadata={"help": "Rank of the factors."})
    alpha: int = field(default=8, metadata={"help": "The delta is scaled by alpha / r."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "In training, drop each output row of the delta with this probability."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "In training, skip the whole adapter of a layer with this probability."}
    )
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "Convolutions with a kernel larger than 1 use the Tucker-2 (CP) form."}
    )
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module r: {name or regex: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module alpha: {name or regex: alpha}."})

    def layer_kwargs(self, target_name: str) -> dict[str, Any]:
        from .targeting import pattern_value

        return {"r": pattern_value(self.rank_pattern, target_name, self.r),
                "alpha": pattern_value(self.alpha_pattern, target_name, self.alpha)}


@dataclass
class PromptLearningConfig(PeftConfig):
    """Base for prompt-learning methods: virtual tokens instead of adapter layers.

    The model dimensions (``token_dim``, ``num_layers``, ``num_attention_heads``) are
    read from the model config when left unset (from ``text_config`` for vision-language
    models); ``num_transformer_submodules`` defaults to 2 for ``SEQ_2_SEQ_LM`` and 1
    otherwise. The registered ``model_cls`` of such a method is a prompt encoder, see
    :mod:`peft_kernel.prompt_learning`.
    """

    num_virtual_tokens: int = field(default=None, metadata={"help": "Number of virtual tokens."})
    token_dim: int = field(default=None, metadata={"help": "Hidden size of the base model's token embeddings."})
    num_transformer_submodules: int | None = field(
        default=None, metadata={"help": "Number of transformer stacks (2 for encoder-decoder, else 1)."}
    )
    num_attention_heads: int | None = field(default=None, metadata={"help": "Attention heads of the base model."})
    num_layers: int | None = field(default=None, metadata={"help": "Layers of the base model."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained fully and saved with the adapter (e.g. a classifier)."}
    )

    is_prompt_learning = True
    #: the prompts are per-layer keys and values in the model's cache, not virtual input tokens
    injects_key_values = False

    def fill_derived_fields(self) -> None:
        """Called once the model dimensions are filled in: set fields whose defaults derive
        from them (e.g. a hidden size that defaults to ``token_dim``). Does nothing by default."""
