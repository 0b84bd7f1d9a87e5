"""Virtual-token machinery shared by every prompt-learning method.

A prompt-learning method registers a config that subclasses
:class:`~peft_kernel.config.PromptLearningConfig` (so ``is_prompt_learning`` is true) and,
as ``model_cls``, a *prompt encoder*. Everything else lives here, written once:

* finding the model's word embeddings and filling the config's model dimensions;
* inserting the virtual-token embeddings in front of ``inputs_embeds`` and extending
  ``attention_mask`` / ``labels`` / ``token_type_ids`` to match, per task type — or, for
  methods whose prompts are per-layer keys and values, putting them into the model's
  key/value cache (:mod:`peft_kernel.key_value_prompts`);
* ``generate`` for decoder-only models (the prompts enter once, when the key/value cache is
  still empty) and encoder-decoder models (virtual tokens on the encoder side, key/value
  prompts in the decoder's self-attention);
* several adapters (one active), ``modules_to_save`` heads, ``disable_adapter()``;
* checkpoint keys (no ``base_model.model.`` prefix, no adapter name).

The prompt-encoder contract
---------------------------
``model_cls(config, word_embeddings)`` returns an ``nn.Module`` where

* ``forward(indices)`` maps a ``LongTensor`` of virtual-token indices, shape
  ``(batch, num_virtual_tokens * num_transformer_submodules)``, to embeddings of shape
  ``(batch, that many, width)``; with ``task_ids`` given to the PeftModel, it is called as
  ``forward(indices, task_ids)``. ``width`` is ``token_dim`` for virtual tokens;
* the class attribute ``checkpoint_keys`` maps checkpoint keys to the encoder's own
  parameter names; the default is HF PEFT's ``{"prompt_embeddings": "embedding.weight"}``;
* the constructor is called under ``torch.device("meta")`` for ``low_cpu_mem_usage`` and
  with ``config.inference_mode`` set whenever a saved adapter is about to be loaded (also
  with ``is_trainable=True``; trainability is applied afterwards): an encoder then builds the
  layout its checkpoint holds and skips data-dependent initialisation (tokenizers,
  vocabulary samples, source checkpoints).

Optional parts, each for methods that need it:

* ``checkpoint_output_key`` (attribute): this checkpoint key stores the encoder's *output*
  for all virtual tokens (the table the model sees), not a parameter. An encoder that trains
  a reparameterisation of its table (an MLP, an LSTM, a projection) saves the table it
  computes; built for loading, it holds that table as the parameter ``checkpoint_keys`` names.
* ``frozen_parameters`` (attribute): names of the encoder's parameters that never train.
* ``forward_inputs`` (attribute) and ``loss(logits, labels, **inputs)``: the keyword inputs
  named in ``forward_inputs`` are taken out of the model call and passed to ``loss``, whose
  result replaces the model's loss whenever labels are given. ``logits`` include the virtual
  positions; ``labels`` are the caller's.
* Key/value prompts: when the config class sets ``injects_key_values = True``, the encoder's
  ``key_values(prompts)`` turns its output ``(batch, num_virtual_tokens, width)`` into
  per-layer keys and values, ``(layers, 2, batch, heads, num_virtual_tokens, head_dim)``.
  For these configs ``token_dim`` and ``num_attention_heads`` describe the attention's keys
  and values (``num_key_value_heads × head_dim`` and ``num_key_value_heads`` on grouped-query
  models, HF PEFT's convention), and ``num_layers`` the number of layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import key_value_prompts as kv
from .auxiliary import ModulesToSaveWrapper
from .errors import PeftWarning
from .plugins import manager
from .tuner import _suffix_in, iter_modules_with_parent

#: label value the loss functions of transformers ignore
IGNORE_INDEX = -100
#: checkpoint layout of encoders that do not declare ``checkpoint_keys``
DEFAULT_CHECKPOINT_KEYS = {"prompt_embeddings": "embedding.weight"}

#: positional parameters of each task class's ``forward`` (HF PEFT's order)
_POSITIONAL = {
    "SEQ_2_SEQ_LM": ("input_ids", "attention_mask", "inputs_embeds", "decoder_input_ids", "decoder_attention_mask",
                     "decoder_inputs_embeds", "labels"),
    "QUESTION_ANS": ("input_ids", "attention_mask", "inputs_embeds", "start_positions", "end_positions"),
    "FEATURE_EXTRACTION": ("input_ids", "attention_mask", "inputs_embeds"),
}
_DEFAULT_POSITIONAL = ("input_ids", "attention_mask", "inputs_embeds", "labels")
#: tasks whose labels are per token, so they get IGNORE_INDEX for every virtual token
_PER_TOKEN_LABELS = {"CAUSAL_LM", "TOKEN_CLS"}
#: tasks that keep token_type_ids (the virtual tokens get type 0); the others drop them
_KEEPS_TOKEN_TYPES = {"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", None}

_DIMENSIONS = {
    "token_dim": ("hidden_size", "n_embd", "d_model"),
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
}


# -- model inspection -------------------------------------------------------------------


def _text_config(model: nn.Module):
    """The config that describes the language part of ``model`` (``text_config`` of VLMs)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get("text_config", config)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        try:
            return getter()
        except Exception:  # some composite configs raise when ambiguous
            pass
    text = getattr(config, "text_config", None)
    return text if text is not None else config


def _config_value(config, names) -> int | None:
    if config is None:
        return None
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def prepare_config(config, model: nn.Module) -> None:
    """Validate ``config`` and fill its unset model dimensions from ``model``'s config.

    ``token_dim`` is required (from the config or the model); ``num_layers`` and
    ``num_attention_heads`` stay ``None`` when the model does not describe them, unless the
    prompts are per-layer keys and values (then they are required, and describe the keys and
    values, see the module docstring). Finally the config's ``fill_derived_fields()`` fills
    fields whose defaults depend on these dimensions.
    """
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")
    text = _text_config(model)
    required = ("token_dim", "num_layers", "num_attention_heads") if config.injects_key_values else ("token_dim",)
    for field_name, names in _DIMENSIONS.items():
        if getattr(config, field_name) is None:
            value = _config_value(text, names)
            if value is None and field_name not in required:
                continue  # only encoders that need the model's shape (e.g. per-layer prompts) read these
            if value is None:
                raise ValueError(
                    f"Please specify `{field_name}` in the {type(config).__name__}: it cannot be read from the "
                    f"model's config (looked for {', '.join(names)})."
                )
            setattr(config, field_name, value)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.injects_key_values:
        _describe_keys_and_values(config, text)
    config.fill_derived_fields()


def _describe_keys_and_values(config, text) -> None:
    """On grouped-query models (fewer key/value heads than query heads) the keys and values
    are ``num_key_value_heads`` heads of ``head_dim``: ``token_dim`` and
    ``num_attention_heads`` are set to describe them, as HF PEFT does."""
    kv_heads = _config_value(text, ("num_key_value_heads",))
    if kv_heads is None:
        return
    head_dim = _config_value(text, ("head_dim",)) or config.token_dim // config.num_attention_heads
    config.token_dim = head_dim * kv_heads
    config.num_attention_heads = kv_heads


def find_word_embeddings(model: nn.Module) -> nn.Module:
    """The module that turns token ids into embeddings.

    ``get_input_embeddings()`` first, then ``embeddings.word_embeddings`` (BERT-like
    backbones), then the first module whose weight has one row per vocabulary entry.
    """
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            embeddings = getter()
        except (NotImplementedError, AttributeError):
            embeddings = None
        if isinstance(embeddings, nn.Module):
            return embeddings
    try:
        return model.get_submodule("embeddings.word_embeddings")
    except AttributeError:
        pass
    vocab_size = _config_value(_text_config(model), ("vocab_size",))
    if vocab_size is not None:
        for name, param in model.named_parameters():
            shape = getattr(param, "ds_shape", None) or param.shape
            if len(shape) == 2 and shape[0] == vocab_size:
                return model.get_submodule(name.rpartition(".")[0])
    raise ValueError(
        f"Cannot find the word embeddings of {type(model).__name__}: it has no get_input_embeddings(), no "
        "embeddings.word_embeddings and no vocabulary-sized parameter. Prompt learning needs them to embed input_ids."
    )


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def _shift_positions(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """``generate``'s position ids (its view: real tokens only, left padding already left out)
    with ``n`` virtual tokens in front: they take positions ``0 … n-1``, every real token
    moves up by ``n``. Works for any leading dimensions (e.g. multimodal rotary positions)."""
    head = torch.arange(n, dtype=position_ids.dtype, device=position_ids.device)
    return torch.cat((head.expand(*position_ids.shape[:-1], n), position_ids + n), dim=-1)


def _mask_2d(mask: torch.Tensor) -> torch.Tensor:
    """A 2-D (batch, key length) keep-mask from a 4-D attention mask (bool or additive)."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    return keep.any(dim=-2).any(dim=1).to(torch.long)


# -- the component ----------------------------------------------------------------------


class PromptLearning:
    """Attached to a :class:`~peft_kernel.PeftModel` whose method is prompt learning.

    The prompt encoders live in ``peft_model.prompt_encoder`` (an ``nn.ModuleDict`` keyed
    by adapter name), so parameter names match HF PEFT's
    (``prompt_encoder.default.embedding.weight``).
    """

    def __init__(self, peft_model) -> None:
        self.peft_model = peft_model
        self.word_embeddings: nn.Module | None = None
        self._disabled = False

    # -- helpers ----------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The wrapped model (``PeftModel.base_model`` is the model itself here)."""
        return self.peft_model.base_model

    @property
    def encoders(self) -> nn.ModuleDict:
        modules = self.peft_model._modules
        if "prompt_encoder" not in modules:
            self.peft_model.prompt_encoder = nn.ModuleDict()
        return modules["prompt_encoder"]

    def _config(self, adapter_name: str | None = None):
        name = self.peft_model.active_adapter if adapter_name is None else adapter_name
        if name is None or name not in self.peft_model.peft_config:
            raise ValueError("No prompt-learning adapter is active; add or load one first")
        return self.peft_model.peft_config[name]

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        owners: list[str] = []
        for path, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and not any(path.startswith(o) for o in owners):
                owners.append(path + ".")
                yield path, module

    def _is_encoder_decoder(self, config) -> bool:
        if config.task_type == "SEQ_2_SEQ_LM":
            return True
        if config.task_type is not None:
            return False
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    # -- adapter management -----------------------------------------------------------

    def add(self, adapter_name: str, config, low_cpu_mem_usage: bool = False) -> None:
        """Create the prompt encoder (and ``modules_to_save`` copies) of a new adapter.

        The first adapter freezes the whole base model. A new adapter only becomes active
        (and trainable) when it is the only one; otherwise ``set_adapter`` activates it.
        """
        prepare_config(config, self.model)
        spec = manager().method(config.peft_type)
        if self.word_embeddings is None:
            self.word_embeddings = find_word_embeddings(self.model)
            # registered like HF PEFT does, so state_dict() keys and `peft_model.word_embeddings` match
            self.peft_model.word_embeddings = self.word_embeddings
        if not len(self.encoders):
            self.model.requires_grad_(False)
        context = torch.device("meta") if low_cpu_mem_usage else contextlib.nullcontext()
        with context:
            encoder = spec.model_cls(config, self.word_embeddings)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"{spec.model_cls.__name__}(config, word_embeddings) must return an nn.Module")
        if config.injects_key_values and not callable(getattr(encoder, "key_values", None)):
            raise TypeError(f"{spec.model_cls.__name__} must define key_values(prompts): {type(config).__name__} "
                            "sets injects_key_values")
        device = _device_of(self.word_embeddings)
        if not low_cpu_mem_usage and device is not None and device.type != "meta":
            encoder = encoder.to(device)
        self.encoders[adapter_name] = encoder
        try:
            self._wrap_modules_to_save(adapter_name, config)
        except BaseException:
            del self.encoders[adapter_name]
            for _, wrapper in self._wrappers():
                wrapper.delete_adapter(adapter_name)
            raise
        self._apply_trainability()

    def _wrap_modules_to_save(self, adapter_name: str, config) -> None:
        names = set(config.modules_to_save or ())
        if not names:
            return
        matched = False
        owners: list[str] = []
        for key, module, parent, attr in list(iter_modules_with_parent(self.model)):
            if not key or any(key.startswith(o) for o in owners):
                continue
            if isinstance(module, ModulesToSaveWrapper):
                owners.append(key + ".")
                if _suffix_in(key, names):
                    module.update(adapter_name)
                    matched = True
            elif _suffix_in(key, names):
                setattr(parent, attr, ModulesToSaveWrapper(module, adapter_name))
                owners.append(key + ".")
                matched = True
        if not matched:
            raise ValueError(f"modules_to_save {sorted(names)} matched no module of the model; check the names")

    def _apply_trainability(self) -> None:
        """Only the active adapter trains (unless it is in inference mode)."""
        active = self.peft_model.active_adapter
        configs = self.peft_model.peft_config
        trainable = active in configs and not configs[active].inference_mode
        for name, encoder in self.encoders.items():
            encoder.requires_grad_(trainable and name == active)
            for frozen in getattr(encoder, "frozen_parameters", ()):
                encoder.get_parameter(frozen).requires_grad_(False)
        if active in configs:
            for _, wrapper in self._wrappers():
                wrapper.set_adapter([active], inference_mode=not trainable)

    def set_adapter(self, adapter_name: str) -> None:
        """Called after ``PeftModel.active_adapter`` changed."""
        self._apply_trainability()

    def unfreeze(self, adapter_name: str) -> None:
        """Make a loaded adapter trainable (``is_trainable=True``): it was built in its saved
        layout, in inference mode; now it trains when active."""
        self.peft_model.peft_config[adapter_name].inference_mode = False
        self._apply_trainability()

    def delete(self, adapter_name: str) -> None:
        """Remove an adapter; when it was active, the first remaining one becomes active."""
        del self.encoders[adapter_name]
        for _, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        if self.peft_model.active_adapter == adapter_name:
            remaining = [n for n in self.peft_model.peft_config if n != adapter_name]
            self.peft_model.active_adapter = remaining[0] if remaining else None
            if remaining:
                self._apply_trainability()

    def freeze(self, adapter_name: str) -> None:
        self.encoders[adapter_name].requires_grad_(False)
        for _, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)

    def move_to_device(self, adapter_name: str) -> None:
        """Put an adapter's encoder next to the word embeddings (after a meta-device load)."""
        device = _device_of(self.word_embeddings) if self.word_embeddings is not None else None
        if device is not None and device.type != "meta":
            self.encoders[adapter_name].to(device)

    # -- virtual tokens ---------------------------------------------------------------

    def _encode(self, name: str, batch_size: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """The encoder's output for ``batch_size`` rows, ``(batch_size, total virtual tokens, width)``."""
        config = self._config(name)
        encoder = self.encoders[name]
        total = config.num_virtual_tokens * config.num_transformer_submodules
        if config.injects_key_values:
            total = config.num_virtual_tokens  # one set of keys and values per layer, for one stack
        device = _device_of(encoder)
        indices = torch.arange(total, dtype=torch.long, device=device).unsqueeze(0)
        if task_ids is not None:
            if task_ids.shape[0] != batch_size and batch_size % task_ids.shape[0] == 0:
                task_ids = task_ids.repeat_interleave(batch_size // task_ids.shape[0], dim=0)
            return encoder(indices.expand(batch_size, -1), task_ids.to(device))
        # encode once, repeat the result (cheaper than encoding batch_size identical rows)
        return encoder(indices).repeat(batch_size, 1, 1)

    def get_prompt(self, batch_size: int, task_ids: torch.Tensor | None = None,
                   adapter_name: str | None = None):
        """The prompts for ``batch_size`` rows: virtual-token embeddings ``(batch_size, total
        virtual tokens, token_dim)``, or, for key/value prompts, a transformers cache that
        holds them (what HF PEFT returns; pass it as the model's cache)."""
        name = self.peft_model.active_adapter if adapter_name is None else adapter_name
        config = self._config(name)
        if not config.injects_key_values:
            return self._encode(name, batch_size, task_ids)
        return kv.prompt_cache(self.model, self._key_values(config, batch_size, task_ids, name),
                               self._is_encoder_decoder(config))

    def _key_values(self, config, batch_size: int, task_ids, name: str | None = None) -> torch.Tensor:
        """Per-layer keys and values, ``(layers, 2, batch, heads, n, head_dim)``, in the model's dtype."""
        name = self.peft_model.active_adapter if name is None else name
        key_values = self.encoders[name].key_values(self._encode(name, batch_size, task_ids))
        weight = getattr(self.word_embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            key_values = key_values.to(device=weight.device, dtype=weight.dtype)
        return key_values

    def get_prompt_embedding_to_save(self, adapter_name: str) -> torch.Tensor:
        """What the checkpoint of ``adapter_name`` holds as ``prompt_embeddings`` (on the CPU): the
        encoder's output for all virtual tokens, or the table itself for encoders whose output
        depends on more than the token (e.g. task ids)."""
        encoder = self.encoders[adapter_name]
        layout = getattr(encoder, "checkpoint_keys", None) or DEFAULT_CHECKPOINT_KEYS
        if getattr(encoder, "checkpoint_output_key", None) is None and "prompt_embeddings" in layout:
            return encoder.get_parameter(layout["prompt_embeddings"]).detach().cpu()
        with torch.no_grad():
            return self._encode(adapter_name, 1, None)[0].detach().cpu()

    def computed_checkpoint_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensors that are computed rather than stored: the encoder's output under its
        ``checkpoint_output_key`` (see the module docstring)."""
        key = getattr(self.encoders[adapter_name], "checkpoint_output_key", None)
        if key is None:
            return {}
        with torch.no_grad():
            return {key: self._encode(adapter_name, 1, None)[0].detach()}

    def _embed(self, input_ids, inputs_embeds):
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is None:
            raise ValueError("Pass input_ids or inputs_embeds: prompt learning prepends virtual tokens to them")
        return self.word_embeddings(input_ids)

    def _with_prompts(self, config, embeds, task_ids):
        prompts = self.get_prompt(embeds.shape[0], task_ids=task_ids)
        prompts = prompts[:, : config.num_virtual_tokens].to(device=embeds.device, dtype=embeds.dtype)
        return torch.cat((prompts, embeds), dim=1)

    @staticmethod
    def _prefix(tensor: torch.Tensor, n: int, value) -> torch.Tensor:
        """``tensor`` (batch, length) with ``n`` columns of ``value`` in front."""
        head = torch.full((tensor.shape[0], n), value, dtype=tensor.dtype, device=tensor.device)
        return torch.cat((head, tensor), dim=1)

    # -- forward ----------------------------------------------------------------------

    def _pop_encoder_inputs(self, kwargs) -> dict:
        """Keyword inputs that belong to the active encoder (its ``forward_inputs``), not the model."""
        name = self.peft_model.active_adapter
        encoder = self.encoders[name] if name in self.encoders else None
        return {key: kwargs.pop(key) for key in getattr(encoder, "forward_inputs", ()) if key in kwargs}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._disabled:
            kwargs.pop("task_ids", None)
            self._pop_encoder_inputs(kwargs)
            return self.model(*args, **kwargs)
        config = self._config()
        names = _POSITIONAL.get(config.task_type, _DEFAULT_POSITIONAL)
        if len(args) > len(names):
            raise TypeError(f"forward takes at most {len(names)} positional arguments ({', '.join(names)})")
        for name, value in zip(names, args, strict=False):  # args may stop before the last name
            if name in kwargs:
                raise TypeError(f"forward got multiple values for argument {name!r}")
            kwargs[name] = value
        encoder_inputs = self._pop_encoder_inputs(kwargs)
        labels = kwargs.get("labels")
        if config.injects_key_values:
            out = self._forward_with_key_values(config, kwargs)
        else:
            out = self._forward_with_virtual_tokens(config, kwargs)
        loss = getattr(self.encoders[self.peft_model.active_adapter], "loss", None)
        if loss is not None and labels is not None:
            out.loss = loss(out.logits, labels, **encoder_inputs)
        return out

    def _forward_with_virtual_tokens(self, config, kwargs):
        task_ids = kwargs.pop("task_ids", None)
        input_ids = kwargs.pop("input_ids", None)
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        n = config.num_virtual_tokens
        if input_ids is None and inputs_embeds is None:
            # encoder_outputs given: the encoder already saw the virtual tokens; the mask must cover them
            self._extend_mask_for_encoder_outputs(kwargs, n)
            return self.model(**kwargs)
        seq2seq = self._is_encoder_decoder(config)
        if kwargs.get("position_ids") is not None:
            warnings.warn("position_ids are ignored with prompt learning: the virtual tokens shift every position; "
                          "the model computes them.", PeftWarning, stacklevel=4)
            kwargs["position_ids"] = None
        self._token_types(config, kwargs, seq2seq, n)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._prefix(kwargs["attention_mask"], n, 1)
        if not seq2seq:
            labels = kwargs.get("labels")
            per_token = config.task_type in _PER_TOKEN_LABELS or (
                config.task_type is None and labels is not None and labels.dim() == 2
                and labels.shape[1] == (input_ids if input_ids is not None else inputs_embeds).shape[1]
            )
            if labels is not None and per_token:
                kwargs["labels"] = self._prefix(labels, n, IGNORE_INDEX)
            if kv.cache_length(kv.find_cache(kwargs)) > 0:
                # the virtual tokens are already in the cache (incremental decoding by hand)
                return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        embeds = self._with_prompts(config, self._embed(input_ids, inputs_embeds), task_ids)
        return self.model(inputs_embeds=embeds, **kwargs)

    def _token_types(self, config, kwargs, seq2seq: bool, n: int) -> None:
        """Virtual input tokens get token type 0 where the task keeps token types; elsewhere
        token types are dropped (with a warning)."""
        if kwargs.get("token_type_ids") is None:
            return
        if not seq2seq and config.task_type in _KEEPS_TOKEN_TYPES:
            if n:
                kwargs["token_type_ids"] = self._prefix(kwargs["token_type_ids"], n, 0)
        else:
            warnings.warn(f"token_type_ids are ignored with prompt learning for task {config.task_type}.",
                          PeftWarning, stacklevel=5)
            kwargs["token_type_ids"] = None

    def _forward_with_key_values(self, config, kwargs):
        """The prompts go into the (decoder's self-attention) key/value cache; inputs, labels
        and outputs keep their length. Masks get ``n`` leading ones; given ``position_ids``
        (positions of the real tokens) move up by ``n``, as the model's own would."""
        n = config.num_virtual_tokens
        seq2seq = self._is_encoder_decoder(config)
        task_ids = kwargs.pop("task_ids", None)
        self._token_types(config, kwargs, seq2seq, 0)
        position_key = "decoder_position_ids" if seq2seq else "position_ids"
        if kwargs.get(position_key) is not None:
            kwargs[position_key] = kwargs[position_key] + n
        mask_key = "decoder_attention_mask" if seq2seq else "attention_mask"
        if kwargs.get(mask_key) is not None:
            kwargs[mask_key] = self._prefix(kwargs[mask_key], n, 1)
        cache = kv.find_cache(kwargs)
        if kv.cache_length(kv.self_attention_cache(cache)) > 0:
            return self.model(**kwargs)  # the prompts are already in the cache (incremental decoding by hand)
        keys = ("input_ids", "inputs_embeds") if not seq2seq else (
            "input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels")
        rows = next((kwargs[k].shape[0] for k in keys if kwargs.get(k) is not None), None)
        if rows is None:
            raise ValueError("Pass input_ids or inputs_embeds: the prompts are made for each row of the batch")
        keyword = kv.cache_keyword(self.model)
        prompts = kv.prompt_cache(self.model, self._key_values(config, rows, task_ids), seq2seq, cache)
        kv.set_cache(kwargs, keyword, prompts)
        with kv.checkpointed_layers_keep_cache(self.model, prompts):
            return self.model(**kwargs)

    def _extend_mask_for_encoder_outputs(self, kwargs, n: int) -> None:
        mask, encoded = kwargs.get("attention_mask"), kwargs.get("encoder_outputs")
        if mask is None or encoded is None:
            return
        hidden = encoded[0] if isinstance(encoded, (tuple, list)) else getattr(encoded, "last_hidden_state", None)
        if hidden is not None and hidden.shape[1] == mask.shape[1] + n:
            kwargs["attention_mask"] = self._prefix(mask, n, 1)

    # -- generate ---------------------------------------------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self._pop_encoder_inputs(kwargs)  # training inputs (e.g. for the encoder's loss)
        if self._disabled:
            kwargs.pop("task_ids", None)
            return self.model.generate(*args, **kwargs)
        config = self._config()
        if self._is_encoder_decoder(config) and not config.injects_key_values:
            return self._generate_encoder_decoder(config, *args, **kwargs)
        return self._generate_with_steps_wrapped(config, *args, **kwargs)

    def _generate_encoder_decoder(self, config, *args, **kwargs):
        """The virtual tokens go in front of the encoder input; the decoder is untouched."""
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise TypeError("generate takes input_ids as its only positional argument")
            kwargs["input_ids"] = args[0]
        task_ids = kwargs.pop("task_ids", None)
        if kwargs.pop("encoder_outputs", None) is not None:
            warnings.warn("encoder_outputs passed to generate are ignored with prompt learning; the encoder must see "
                          "the virtual tokens.", PeftWarning, stacklevel=3)
        for key in ("position_ids", "token_type_ids"):
            if kwargs.get(key) is not None:
                warnings.warn(f"{key} are ignored with prompt learning.", PeftWarning, stacklevel=3)
            kwargs.pop(key, None)
        input_ids = kwargs.pop("input_ids", None)
        embeds = self._embed(input_ids, kwargs.pop("inputs_embeds", None))
        kwargs["inputs_embeds"] = self._with_prompts(config, embeds, task_ids)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = self._prefix(kwargs["attention_mask"], config.num_virtual_tokens, 1)
        return self.model.generate(**kwargs)

    def _generate_with_steps_wrapped(self, config, *args, **kwargs):
        """Run the model's own ``generate`` with its ``prepare_inputs_for_generation``
        wrapped for the duration of the call (restored afterwards, also on errors)."""
        task_ids = kwargs.pop("task_ids", None)
        model = self.model
        self._size_fixed_cache(config, args, kwargs)
        original = model.prepare_inputs_for_generation
        own = model.__dict__.get("prepare_inputs_for_generation", _MISSING)
        step = self._prepare_key_value_step if config.injects_key_values else self._prepare_step

        @functools.wraps(original)
        def prepare_inputs_for_generation(*p_args, **p_kwargs):
            return step(original, config, task_ids, *p_args, **p_kwargs)

        model.prepare_inputs_for_generation = prepare_inputs_for_generation
        try:
            return model.generate(*args, **kwargs)
        finally:
            if own is _MISSING:
                model.__dict__.pop("prepare_inputs_for_generation", None)
            else:
                model.prepare_inputs_for_generation = own

    def _size_fixed_cache(self, config, args, kwargs) -> None:
        """Caches of fixed size (``cache_implementation="static"``, ...) are sized by
        ``generate`` for the real tokens only; make room for the virtual ones."""
        if kv.find_cache(kwargs) is not None:
            return
        generation_config = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        implementation = kwargs.get("cache_implementation", getattr(generation_config, "cache_implementation", None))
        if implementation in (None, "dynamic", "offloaded", "quantized"):
            return
        inputs = args[0] if args else kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        length = inputs.shape[1] if inputs is not None else 0
        new_tokens = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        total = length + new_tokens if new_tokens is not None else kwargs.get(
            "max_length", getattr(generation_config, "max_length", None) or 0)
        current = kwargs.get("max_cache_len", getattr(generation_config, "max_cache_len", None)) or 0
        kwargs["max_cache_len"] = max(current, total + config.num_virtual_tokens)

    def _step_mask(self, kwargs, key: str, n: int) -> None:
        """A generation step's 2-D mask (from a dict or a 4-D mask if need be) with ``n`` leading ones."""
        mask = kwargs.get(key)
        if isinstance(mask, dict):
            if len(mask) != 1:
                raise ValueError(f"Expected a single attention mask, got {len(mask)} ({sorted(mask)})")
            mask = next(iter(mask.values()))
        if mask is not None:
            if mask.dim() == 4:
                mask = _mask_2d(mask)
            kwargs[key] = self._prefix(mask, n, 1)

    def _prepare_step(self, original, config, task_ids, *args, **kwargs):
        """One generation step. The virtual tokens enter while the cache is empty (the
        prefill, or every step without a cache); afterwards they live in the cache and
        only the attention mask and the positions have to account for them."""
        n = config.num_virtual_tokens
        kwargs.pop("token_type_ids", None)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None:
            kwargs["position_ids"] = _shift_positions(position_ids, n)
        self._step_mask(kwargs, "attention_mask", n)
        if kv.cache_length(kv.find_cache(kwargs)) == 0:
            input_ids = args[0] if args else kwargs.get("input_ids")
            user_embeds = kwargs.get("inputs_embeds")
            if user_embeds is not None and (input_ids is None or input_ids.shape[-1] == 0):
                embeds = user_embeds
            else:
                embeds = self.word_embeddings(input_ids)
            kwargs["inputs_embeds"] = self._with_prompts(config, embeds, task_ids)
            kwargs["is_first_iteration"] = True
            kwargs["next_sequence_length"] = None  # never cut the virtual tokens off
        else:
            kwargs.pop("inputs_embeds", None)
        model_inputs = original(*args, **kwargs)
        model_inputs.pop("token_type_ids", None)
        return model_inputs

    def _prepare_key_value_step(self, original, config, task_ids, *args, **kwargs):
        """One generation step with key/value prompts: they go into the cache while it is
        empty (the prefill; every step without a cache); masks get ``n`` leading ones and
        positions move up by ``n``, on every step. Inputs are untouched."""
        n = config.num_virtual_tokens
        seq2seq = self._is_encoder_decoder(config)
        position_key = "decoder_position_ids" if seq2seq else "position_ids"
        if kwargs.get(position_key) is not None:
            kwargs[position_key] = kwargs[position_key] + n
        self._step_mask(kwargs, "decoder_attention_mask" if seq2seq else "attention_mask", n)
        cache = kv.find_cache(kwargs)
        if kwargs.get("use_cache") is False:
            cache = None  # a model may hand back the cache it was given; without caching every step starts afresh
        if cache is None or kv.cache_length(kv.self_attention_cache(cache)) == 0:
            ids = args[0] if args else kwargs.get("decoder_input_ids" if seq2seq else "input_ids")
            if ids is None or ids.shape[-1] == 0:
                ids = kwargs["inputs_embeds"]
            prompts = kv.prompt_cache(self.model, self._key_values(config, ids.shape[0], task_ids), seq2seq, cache)
            kv.set_cache(kwargs, _step_cache_keyword(original, kwargs), prompts)
        return original(*args, **kwargs)

    # -- disabling --------------------------------------------------------------------

    @contextlib.contextmanager
    def disabled(self):
        """Run the plain model: no virtual tokens, original ``modules_to_save`` modules.
        Trainability flags are restored on exit."""
        if self._disabled:
            yield
            return
        wrappers = [w for _, w in self._wrappers()]
        flags = [(p, p.requires_grad) for w in wrappers for p in w.parameters()]
        states = [w.disable_adapters for w in wrappers]
        for wrapper in wrappers:
            wrapper.enable_adapters(False)
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for wrapper, was_disabled in zip(wrappers, states, strict=True):
                if not was_disabled:
                    wrapper.enable_adapters(True)
            for param, flag in flags:
                param.requires_grad_(flag)

    # -- checkpoints ------------------------------------------------------------------

    def key_map(self, adapter_name: str) -> dict[str, str]:
        """``{in-memory key: checkpoint key}`` (checkpoint keys have no prefix)."""
        encoder = self.encoders[adapter_name]
        layout = getattr(encoder, "checkpoint_keys", None) or DEFAULT_CHECKPOINT_KEYS
        mapping = {f"prompt_encoder.{adapter_name}.{inner}": disk for disk, inner in layout.items()}
        for path, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                for sub in wrapper.modules_to_save[adapter_name].state_dict():
                    mapping[f"base_model.{path}.modules_to_save.{adapter_name}.{sub}"] = f"base_model.{path}.{sub}"
        return mapping


_MISSING = object()


def _step_cache_keyword(prepare_inputs_for_generation, kwargs: dict) -> str:
    """The keyword ``generate`` hands the cache to ``prepare_inputs_for_generation`` under."""
    present = [key for key in kv.CACHE_KEYS if key in kwargs]
    if present:
        return present[0]
    parameters = inspect.signature(prepare_inputs_for_generation).parameters
    return next((key for key in kv.CACHE_KEYS if key in parameters), kv.CACHE_KEYS[0])
