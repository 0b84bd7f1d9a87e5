"""Prompts that enter the model as per-layer keys and values, through its key/value cache.

Some prompt-learning methods put nothing in front of the input. Their prompt encoder makes,
for every attention layer, ``n`` key vectors and ``n`` value vectors that every real token
attends to. A transformers model already has a place for such vectors: its key/value cache.
Filled with the prompts before the model runs, the cache makes the model treat them as
``n`` tokens it has already seen — exactly what the method means:

* every attention mask grows by ``n`` columns of ones in front;
* the real tokens' positions start at ``n`` (the model derives them from the cache length);
* the output has no extra positions (logits, labels and hidden states keep their length).

Everything here uses transformers' public ``Cache`` API (``DynamicCache``,
``EncoderDecoderCache``, ``update``, ``get_seq_length``); which keyword a model takes its
cache under (``cache`` since transformers 5.2x, ``past_key_values`` before) is read from the
model's own signatures, never from a version string.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from torch import nn

#: keyword names of the key/value cache in transformers' forward/generate calls (``past_key_values``
#: became ``cache`` in transformers 5.2x; both are looked for, whichever the installed version takes)
CACHE_KEYS = ("cache", "past_key_values")


def find_cache(kwargs: dict):
    """The cache in a call's keyword arguments, under either name (``None`` when absent)."""
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def cache_length(cache) -> int:
    """Positions already in ``cache`` (0 for ``None``; legacy tuple caches too)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    return 0


@functools.cache
def _keyword_of(forward) -> str | None:
    parameters = inspect.signature(forward).parameters
    return next((key for key in CACHE_KEYS if key in parameters), None)


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a key/value cache.

    Read from ``model.forward``; task heads whose forward only passes ``**kwargs`` on to
    their backbone (e.g. sequence classification) are answered by the first submodule
    whose forward names a cache.
    """
    for module in model.modules():
        keyword = _keyword_of(type(module).forward)
        if keyword is not None:
            return keyword
    raise ValueError(
        f"{type(model).__name__} takes no key/value cache (no submodule's forward has a `cache` or "
        "`past_key_values` argument), so per-layer prompts cannot reach its attention layers."
    )


def set_cache(kwargs: dict, keyword: str, cache) -> None:
    """Put ``cache`` into ``kwargs`` under ``keyword``, dropping it under any other name."""
    for key in CACHE_KEYS:
        kwargs.pop(key, None)
    kwargs[keyword] = cache


def self_attention_cache(cache):
    """The part of ``cache`` that a model's (decoder) self-attention reads."""
    return getattr(cache, "self_attention_cache", cache)


def new_cache(model: nn.Module, encoder_decoder: bool):
    """An empty dynamic cache for ``model`` (an encoder-decoder cache for seq2seq models)."""
    from transformers import DynamicCache, EncoderDecoderCache

    if encoder_decoder:
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    config = getattr(model, "config", None)  # a transformers config tells the layer kinds (e.g. sliding windows)
    return DynamicCache(config=config) if hasattr(config, "get_text_config") else DynamicCache()


def prompt_cache(model: nn.Module, key_values: torch.Tensor, encoder_decoder: bool, cache=None):
    """A cache holding per-layer prompts: ``cache`` (which must be empty) filled, or a new one.

    ``key_values`` has shape ``(layers, 2, batch, heads, n, head_dim)``: layer ``i``'s keys are
    ``key_values[i, 0]``, its values ``key_values[i, 1]``. Encoder-decoder caches get them in
    their self-attention part (the decoder's); their cross-attention part stays empty. A new
    cache is read-only while gradient checkpointing is on (see below).
    """
    if cache is None:
        cache = frozen_cache_for(model, encoder_decoder)
    if cache is None:  # (an empty cache is falsy: compare with None)
        cache = new_cache(model, encoder_decoder)
    target = self_attention_cache(cache)
    if cache_length(target):
        raise ValueError("the key/value cache already holds tokens; per-layer prompts go into an empty cache")
    for layer, (keys, values) in enumerate(key_values):
        target.update(keys, values, layer)
    if hasattr(target, "frozen"):
        target.frozen = True
    return cache


# -- gradient checkpointing -------------------------------------------------------------
#
# A checkpointed layer runs twice: once in the forward pass and once more in the backward pass,
# to rebuild what it did not keep. A cache that grows on every `update` would hand the second run
# keys of the wrong length, and transformers therefore drops the cache of checkpointed layers
# (with it, the prompts). Layers that only *read* a cache may keep it (`_can_checkpoint_with_cache`,
# transformers 5.2x): for those the prompts go into a cache that answers `update` with
# prompts + new states without storing anything, so both runs see the same keys.


@functools.cache
def _frozen_cache_classes():
    """The read-only cache classes (built once, when transformers is first needed here)."""
    from transformers import DynamicCache, EncoderDecoderCache

    class FrozenPromptCache(DynamicCache):
        """Holds the prompts only: once filled (``frozen``), ``update`` returns prompts + the
        given states and stores nothing, so a layer run twice sees the same keys twice."""

        frozen = False

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            if not self.frozen:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
                return key_states, value_states
            layer = self.layers[layer_idx]
            return torch.cat((layer.keys, key_states), dim=-2), torch.cat((layer.values, value_states), dim=-2)

    class _NeverUpdated(dict):
        """Cross-attention states are recomputed on every run instead of being cached."""

        def __setitem__(self, key, value) -> None:
            pass

    class FrozenEncoderDecoderCache(EncoderDecoderCache):
        def __init__(self, self_attention, cross_attention):
            super().__init__(self_attention, cross_attention)
            self.is_updated = _NeverUpdated()

    return FrozenPromptCache, FrozenEncoderDecoderCache


def _checkpointing_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers without per-layer checkpointing
        return None
    return GradientCheckpointingLayer


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """transformers' layers that will checkpoint in this forward."""
    layer_class = _checkpointing_layer_class()
    if layer_class is None or not (model.training and torch.is_grad_enabled()):
        return []
    return [m for m in model.modules() if isinstance(m, layer_class) and m.gradient_checkpointing]


def checkpointing_keeps_caches() -> bool:
    """Whether the installed transformers lets a checkpointed layer keep a (read-only) cache."""
    return hasattr(_checkpointing_layer_class(), "_can_checkpoint_with_cache")


def frozen_cache_for(model: nn.Module, encoder_decoder: bool):
    """A read-only prompt cache when gradient checkpointing is on in ``model`` (training,
    gradients enabled), else ``None`` (a normal cache will do)."""
    layers = _checkpointed_layers(model)
    if not layers:
        return None
    if not checkpointing_keeps_caches():
        kinds = ", ".join(sorted({type(m).__name__ for m in layers}))
        raise ValueError(
            f"Gradient checkpointing drops the key/value cache in {kinds} with the installed "
            "transformers, and with it the per-layer prompts (they would get no gradient). Train without gradient "
            "checkpointing, or upgrade transformers to a version whose layers can keep a read-only cache."
        )
    frozen, frozen_encoder_decoder = _frozen_cache_classes()
    if not encoder_decoder:
        return frozen()
    cross_attention = frozen()
    cross_attention.frozen = True  # stays empty: cross-attention states are recomputed on every run
    return frozen_encoder_decoder(frozen(), cross_attention)


@contextlib.contextmanager
def checkpointed_layers_keep_cache(model: nn.Module, cache) -> Iterator[None]:
    """Let checkpointed layers keep ``cache`` for the duration of one forward, when it is a
    read-only prompt cache (see :func:`frozen_cache_for`)."""
    layers = _checkpointed_layers(model) if getattr(self_attention_cache(cache), "frozen", False) else []
    for layer in layers:
        layer._can_checkpoint_with_cache = True  # an instance attribute over the class default
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_can_checkpoint_with_cache", None)
