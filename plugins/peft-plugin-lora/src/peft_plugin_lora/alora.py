"""Activated LoRA (aLoRA): an adapter that applies only from its invocation sequence on.

Every aLoRA adapter names an invocation sequence (``alora_invocation_tokens``). In each input
row its *last* occurrence starts the adapted span: tokens before it get exactly the base
model's outputs (so their key/value cache is the base model's and can be reused), tokens from
it on get base + LoRA. A row without the sequence gets the base model throughout.

Layers see only the tokens of the current forward, so the span is passed to them as per-row
*offsets from the end*: a forward over T tokens that are the last T of an N-token sequence
adapts its last ``min(N - start, T)`` tokens. ``LoraModel.per_call_state`` computes them
before every forward of the base model: from that forward's ``input_ids`` in a plain forward,
and from the prompt (start positions found once) plus the cache length in ``generate``, so
cached steps, ``use_cache=False`` and a prefix cache computed by the base model all see the
same span as a full forward over the sequence.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from peft_kernel import PeftWarning

#: the per-call state key: ``{adapter name: [offset from the end, or None, per row]}``
OFFSETS = "alora_offsets"


def invocation_starts(input_ids: torch.Tensor, tokens: Sequence[int]) -> list[int | None]:
    """Per row, the position where the last occurrence of ``tokens`` starts (``None``: absent)."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    n = len(tokens)
    if ids.shape[1] < n:
        return [None] * ids.shape[0]
    pattern = torch.as_tensor(tokens, device=ids.device, dtype=ids.dtype)
    hits = ids.unfold(1, n, 1).eq(pattern).all(-1)  # (rows, positions)
    starts = []
    for row in hits:
        found = row.nonzero()
        starts.append(int(found[-1]) if found.numel() else None)
    return starts


def _input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def _tokens_in_step(args: tuple, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """``(rows, tokens)`` of one forward of the base model."""
    ids = _input_ids(args, kwargs)
    if ids is not None:
        return (1, ids.shape[0]) if ids.dim() == 1 else (ids.shape[0], ids.shape[1])
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[0], embeds.shape[1]
    return None


def _cached_tokens(kwargs: dict[str, Any]) -> int:
    """How many tokens the key/value cache passed to this forward already holds."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (key, value) per layer


def offsets_step(invocations: dict[str, list[int]], args: tuple, kwargs: dict[str, Any],
                 generating: bool) -> Callable[[tuple, dict], dict]:
    """The per-call step function of ``LoraModel.per_call_state`` for the aLoRA adapters
    ``invocations`` (name -> tokens); ``args`` / ``kwargs`` are the call's arguments."""
    given = kwargs.get(OFFSETS)
    if not generating:
        def step(args, step_kwargs):
            return {OFFSETS: _forward_offsets(invocations, args, step_kwargs, given)}
        return step
    prompt = _input_ids(args, kwargs)
    if prompt is None:
        warnings.warn("aLoRA needs input_ids to find its invocation sequence; without them the aLoRA adapters are "
                      "off for this call", PeftWarning, stacklevel=4)
        return lambda args, step_kwargs: {OFFSETS: {}}
    prompt = prompt if prompt.dim() == 2 else prompt[None]
    length = prompt.shape[1]
    if given is not None:  # offsets from the end of the prompt, as the caller computed them
        starts = {name: [None if o is None else length - int(o) for o in given] for name in invocations}
    else:
        starts = {name: invocation_starts(prompt, tokens) for name, tokens in invocations.items()}
        _warn_missing(starts)

    def step(args, step_kwargs):
        shape = _tokens_in_step(args, step_kwargs)
        if shape is None:
            return {OFFSETS: {}}
        rows, tokens = shape
        total = _cached_tokens(step_kwargs) + tokens
        return {OFFSETS: {name: _repeat([None if s is None else total - s for s in per_row], rows)
                          for name, per_row in starts.items()}}

    return step


def _forward_offsets(invocations, args, kwargs, given) -> dict[str, list[int | None]]:
    ids = _input_ids(args, kwargs)
    if given is not None:
        return {name: list(given) for name in invocations}
    if ids is None:
        warnings.warn("aLoRA needs input_ids to find its invocation sequence; without them the aLoRA adapters are "
                      "off for this forward", PeftWarning, stacklevel=5)
        return {}
    ids = ids if ids.dim() == 2 else ids[None]
    starts = {name: invocation_starts(ids, tokens) for name, tokens in invocations.items()}
    _warn_missing(starts)
    return {name: [None if s is None else ids.shape[1] - s for s in per_row] for name, per_row in starts.items()}


def _warn_missing(starts: dict[str, list[int | None]]) -> None:
    for name, per_row in starts.items():
        missing = [i for i, s in enumerate(per_row) if s is None]
        if missing:
            warnings.warn(f"The invocation sequence of aLoRA adapter {name!r} is not in row(s) {missing}; they get "
                          "the base model's output", PeftWarning, stacklevel=5)


def _repeat(values: list, rows: int) -> list:
    """Per-row values for ``rows`` rows (generate expands each sample into beams)."""
    if rows == len(values) or not values:
        return values
    if rows % len(values):
        raise ValueError(f"aLoRA got offsets for {len(values)} rows but a forward over {rows} rows")
    return [v for v in values for _ in range(rows // len(values))]


def adapted_rows(offsets: Sequence[int | None], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Indices, into the input flattened to ``(rows · tokens, features)``, of the tokens an aLoRA
    adapter applies to: the last ``offset`` tokens of each row (none for ``None``)."""
    batch = shape[0]
    tokens = shape[1] if len(shape) == 3 else 1
    if len(offsets) != batch:
        raise ValueError(f"aLoRA has offsets for {len(offsets)} rows but the layer got {batch}")
    counts = torch.tensor([0 if o is None else min(max(int(o), 0), tokens) for o in offsets], device=device)
    positions = torch.arange(tokens, device=device)
    mask = positions[None, :] >= (tokens - counts)[:, None]
    return mask.reshape(-1).nonzero().squeeze(-1)
