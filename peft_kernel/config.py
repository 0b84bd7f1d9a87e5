"""Adapter configurations: the base every method config builds on.

A config is a dataclass; its fields are exactly what ``adapter_config.json`` holds, so a
file written here loads in HF PEFT and the reverse. ``peft_type`` strings are resolved to
config classes through the plugin registry only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import io
from .errors import ConfigTypeError, PeftWarning

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


class _PeftTypeMeta(type):
    def __getattr__(cls, name: str) -> PeftType:
        if name.isupper():  # PeftType.<ID>, as with HF PEFT's enum; the set of ids stays open
            return cls(name)
        raise AttributeError(name)

    def __iter__(cls):
        """The registered method ids (as iterating HF PEFT's enum lists its methods)."""
        from .plugins import manager

        return iter([cls(name) for name in sorted(manager().methods())])

    def __contains__(cls, value: object) -> bool:
        from .plugins import manager

        return isinstance(value, str) and str.__str__(value) in manager().methods()


class PeftType(str, metaclass=_PeftTypeMeta):
    """A method id (``peft_type``): a plain string that also answers to the spelling of HF
    PEFT's enum, ``PeftType.<ID>`` and ``config.peft_type.value``, which code written for HF
    PEFT (transformers, diffusers) uses. Any registered id is valid."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The member name of HF PEFT's enum, which is the id itself."""
        return str.__str__(self)


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
    #: whether ``save_embedding_layers="auto"`` saves the full weights of targeted embeddings;
    #: ``False`` for a method that trains only part of a targeted embedding and saves that part
    saves_targeted_embeddings: ClassVar[bool] = True
    #: whether the method itself keeps modules that share the input embeddings' weight (a tied
    #: output head) tied, so that ``ensure_weight_tying`` is not needed and not warned about
    keeps_weight_tying: ClassVar[bool] = False

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "peft_type" and type(value) is str:
            value = PeftType(value)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.peft_version is None:
            self.peft_version = f"{PEFT_FORMAT_VERSION}+peftkernel.{_kernel_version()}"
        if self.task_type is not None and self.task_type not in TaskType.__members__:
            raise ValueError(
                f"Invalid task_type {self.task_type!r}; expected one of {', '.join(TaskType.__members__)}."
            )
        if self.task_type is not None:
            self.task_type = TaskType(self.task_type)  # a str that also has HF's .value / .name

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
        with io.staged(save_directory) as stage:
            self.write_json(os.path.join(stage, CONFIG_NAME), extra=kwargs.pop("extra", None))

    def write_json(self, path: str, extra: dict | None = None) -> None:
        """Write the config (plus ``extra`` fields) as JSON to the file ``path``."""
        data = self.to_dict()
        data.update(extra or {})
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_peft_type(cls, **kwargs) -> PeftConfig:
        """Build the config class registered for ``kwargs["peft_type"]``."""
        if "peft_type" not in kwargs:
            raise ValueError("adapter config has no 'peft_type' naming its method, so it is not a PEFT adapter config; "
                             "point to the adapter's directory, not the model's")
        if not isinstance(kwargs["peft_type"], str):
            raise ValueError(
                f"adapter config's peft_type must be the name of a method (a string), got {kwargs['peft_type']!r}"
            )
        from .plugins import manager

        config_cls = manager().method(kwargs["peft_type"]).config_cls
        return config_cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build ``cls`` from a dict, dropping (with a warning) keys this version does not know."""
        if not isinstance(data, dict):
            raise ValueError(f"an adapter config is a JSON object of fields, got a {type(data).__name__}")
        if not all(isinstance(k, str) for k in data):
            raise ValueError(f"adapter config field names must be strings, got {sorted(map(repr, data))}")
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
        with open(path, "rb") as fh:
            try:
                return json.loads(fh.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path} is not valid JSON ({exc}); was it written completely?") from None
            except RecursionError:
                raise ValueError(f"{path} nests too deeply to be an adapter config") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load ``adapter_config.json`` from a directory or a Hub repo id (``subfolder`` inside it;
        ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download`` as in
        ``huggingface_hub.hf_hub_download``). From a directory, the config of its last complete
        save is read (see :mod:`peft_kernel.io`)."""
        from .hub import resolve_file, split_hub_kwargs

        hub_kwargs, _ = split_hub_kwargs(kwargs)
        with io.locked(os.path.join(pretrained_model_name_or_path, subfolder or "")):
            try:
                file = resolve_file(pretrained_model_name_or_path, (CONFIG_NAME,), subfolder=subfolder, **hub_kwargs)
            except FileNotFoundError as exc:
                raise ValueError(f"Can't find {CONFIG_NAME} at {pretrained_model_name_or_path!r}: {exc}") from None
            data = cls.from_json_file(file)
        return cls.from_dict(data)


# -- field types -------------------------------------------------------------------------
#
# A config is built from user code, from a CLI option or from a JSON file written by anyone.
# Each field's value is checked against the field's annotation here, once, for every method:
# a wrong type is an error that names the field, instead of a failure deep inside a layer.

_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def check_field_types(config: PeftConfig) -> None:
    """Raise :class:`~peft_kernel.errors.ConfigTypeError` (a ``TypeError`` and a ``ValueError``;
    a plain ``ValueError`` for a ``Literal`` field) naming the first field whose value does not
    fit its annotation.

    Numbers are interchangeable (an ``int`` field takes ``16.0``), lists, tuples and sets are
    interchangeable, a dict is accepted for a dataclass-typed field (it is converted later),
    ``None`` is accepted where the default is ``None``, and annotations that cannot be
    resolved are not checked.
    """
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        if not f.init or f.name not in hints:
            continue
        value = getattr(config, f.name)
        if value is None and f.default is None:
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(value)):
            raise ValueError(f"{type(config).__name__}.{f.name} must be finite, got {value!r}")
        if not _conforms(value, hints[f.name]):
            import typing

            # a value outside a fixed set of choices is a bad value; anything else a bad type
            error = ValueError if typing.get_origin(hints[f.name]) is typing.Literal else ConfigTypeError
            raise error(
                f"{type(config).__name__}.{f.name} must be {_describe(hints[f.name])}, got {value!r} "
                f"({type(value).__name__})"
            )


def _leaves(value: Any):
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _field_types(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        import typing

        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation names something unimportable: resolve field by field
            hints = {}
            for klass in reversed(cls.__mro__):
                module = sys.modules.get(klass.__module__)
                namespace = dict(vars(module)) if module is not None else {}
                for name, annotation in vars(klass).get("__annotations__", {}).items():
                    try:
                        hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
                    except Exception:
                        hints.pop(name, None)
        _FIELD_TYPES[cls] = hints
    return _FIELD_TYPES[cls]


def _conforms(value: Any, annotation: Any) -> bool:
    import numbers
    import types
    import typing

    if annotation is Any or annotation is object:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation in (int, float):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        item = args[0] if origin is not tuple and len(args) == 1 else Any
        return all(_conforms(v, item) for v in value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        key, item = args if len(args) == 2 else (Any, Any)
        return all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return isinstance(value, annotation) or any(value == m.value for m in annotation)
        return isinstance(value, annotation) or (dataclasses.is_dataclass(annotation) and isinstance(value, dict))
    return True  # anything else (type variables, callables, ...) is the method's to check


def _describe(annotation: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if annotation in (int, float):
        return "a number"
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set, frozenset):
        return f"a list of {_describe(args[0]).removeprefix('a ')}" if len(args) == 1 else "a list"
    if origin is dict or annotation is dict:
        return "a dict"
    if dataclasses.is_dataclass(annotation):  # a dict is converted to it later
        return f"a {annotation.__name__}, a dict"
    return getattr(annotation, "__name__", str(annotation))


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
        self._check_patterns()
        self._check_dropouts()

    def _check_dropouts(self) -> None:
        """Fields named ``*_dropout`` (every method's dropout on its input) are probabilities."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_dropout") and isinstance(value, (int, float)) and not 0 <= value <= 1:
                raise ValueError(f"{f.name} is a dropout probability and must be between 0 and 1, got {value!r}")

    def _check_patterns(self) -> None:
        """Every regex the matching rules will compile compiles: a string ``*_modules`` field
        (a full-match regex), the keys of a ``*_pattern`` dict (suffix regexes) and
        ``layers_pattern``."""
        import re

        patterns = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_modules") and isinstance(value, str):
                patterns.append((f.name, value, value))
            elif f.name.endswith("_pattern") and isinstance(value, dict):
                patterns += [(f"{f.name} key", key, rf"(.*\.)?({key})$") for key in value if isinstance(key, str)]
        layers = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        patterns += [("layers_pattern", p, rf"(?:^|\.){p}\.(\d+)\.") for p in layers if isinstance(p, str)]
        for what, pattern, compiled in patterns:
            try:
                re.compile(compiled)
            except (re.error, RecursionError, OverflowError) as exc:
                raise ValueError(
                    f"{what} {pattern!r} is not a valid regular expression ({exc}); a string here is a regex, so "
                    "escape special characters (re.escape) or give a list of module names"
                ) from None

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
