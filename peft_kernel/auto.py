"""``AutoPeftModel`` and its task classes: one call builds the base model that an adapter names
(``base_model_name_or_path``, at ``revision``) with transformers' auto classes and loads the
adapter onto it. transformers is imported only here, only when used."""

from __future__ import annotations

import importlib
from typing import Any

from .config import PeftConfig
from .hub import HUB_KWARGS, resolve_file, split_hub_kwargs
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

#: where the base comes from as well as the adapter (``subfolder`` and ``revision`` are the adapter's own)
_SHARED_HUB_KWARGS = tuple(k for k in HUB_KWARGS if k not in ("subfolder", "revision"))


class AutoPeftModel:
    """``AutoPeftModel.from_pretrained(adapter)``: the base model class comes from the adapter's
    ``auto_mapping`` (written for adapters without a ``task_type``); the task classes below use
    the transformers auto class of their task instead."""

    #: name of the transformers auto class that builds the base model (None: read ``auto_mapping``)
    auto_class_name: str | None = None
    peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, revision: str | None = None,
                        **kwargs: Any) -> PeftModel:
        """Build the base model and load the adapter at ``pretrained_model_name_or_path`` (a
        directory or a Hub repo id at ``revision``) onto it. Other keyword arguments go to the base
        model's ``from_pretrained`` (``dtype``, ``device_map``, ...); ``token``, ``cache_dir``,
        ``local_files_only`` and ``force_download`` apply to both downloads."""
        hub_kwargs, base_kwargs = split_hub_kwargs(kwargs)
        hub_kwargs["revision"] = revision
        base_kwargs.update({k: v for k, v in hub_kwargs.items() if k in _SHARED_HUB_KWARGS})
        peft_config = config or PeftConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        base_cls = cls._base_class(peft_config)
        if not peft_config.base_model_name_or_path:
            raise ValueError(f"The adapter at {pretrained_model_name_or_path!r} does not name its base model "
                             "(base_model_name_or_path); build the base yourself and use PeftModel.from_pretrained.")
        base = base_cls.from_pretrained(peft_config.base_model_name_or_path, revision=peft_config.revision,
                                        **base_kwargs)
        _fit_embeddings_to_tokenizer(base, pretrained_model_name_or_path, hub_kwargs)
        return cls.peft_class.from_pretrained(base, pretrained_model_name_or_path, adapter_name=adapter_name,
                                              is_trainable=is_trainable, config=config, **hub_kwargs)

    @classmethod
    def _base_class(cls, peft_config: PeftConfig):
        task_type = peft_config.task_type
        if cls.auto_class_name is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(task_type)
            if task_type is not None and expected is not cls.peft_class:
                right = "AutoPeftModelFor" + expected.__name__.removeprefix("PeftModelFor")
                raise ValueError(f"The adapter was trained for task {task_type}; load it with {right}, "
                                 f"not {cls.__name__}")
            import transformers

            return getattr(transformers, cls.auto_class_name)
        if task_type is not None:
            raise ValueError(f"The adapter has task_type {task_type}; load it with the AutoPeftModelFor... class of "
                             "that task (e.g. AutoPeftModelForCausalLM)")
        mapping = peft_config.auto_mapping or {}
        if "base_model_class" not in mapping or "parent_library" not in mapping:
            raise ValueError("The adapter has neither a task_type nor an auto_mapping, so its base model class is "
                             "unknown; build the base yourself and use PeftModel.from_pretrained.")
        return getattr(importlib.import_module(mapping["parent_library"]), mapping["base_model_class"])


def _fit_embeddings_to_tokenizer(base, adapter: str, hub_kwargs: dict[str, Any]) -> None:
    """An adapter saved with a tokenizer that grew the vocabulary (and the embeddings with it)
    needs the base's embeddings resized before its weights fit."""
    try:
        resolve_file(adapter, ("tokenizer_config.json",), **hub_kwargs)
    except OSError:  # no tokenizer saved with the adapter
        return
    if not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter, **{k: v for k, v in hub_kwargs.items() if v is not None})
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


class AutoPeftModelForCausalLM(AutoPeftModel):
    auto_class_name = "AutoModelForCausalLM"
    peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    auto_class_name = "AutoModelForSequenceClassification"
    peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(AutoPeftModel):
    auto_class_name = "AutoModelForTokenClassification"
    peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    auto_class_name = "AutoModelForQuestionAnswering"
    peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    auto_class_name = "AutoModel"
    peft_class = PeftModelForFeatureExtraction
