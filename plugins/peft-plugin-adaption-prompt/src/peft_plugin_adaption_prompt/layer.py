"""Adaption-prompt layers: an attention module wrapped with, per adapter, a prompt ``P``
of shape ``(1, adapter_len, hidden)`` and a gate ``g`` of shape ``(1,)``.

For hidden states ``x`` the layer returns the wrapped attention's output plus a gated
attention over the prompt, computed from the same queries::

    y = attn(x) + W_o · heads( g · softmax(s · Q K_Pᵀ) · V_P )

``Q`` is the attention's own query projection of ``x`` (with its rotary positions),
``K_P`` / ``V_P`` its key / value projections of ``P`` (no positions: the prompt is seen from
every position alike), ``s = 1/√head_dim`` and ``W_o`` its output projection *without*
its bias (the attention's output already carries the bias once). With grouped-query
attention each query head reads the prompt keys of its key/value head. ``g`` starts at 0,
so a new adapter is an exact identity; ``P`` starts as standard normal samples.

The prompt term of a position depends on nothing but that position's query, so caches,
padding and beam search need no special treatment, and the wrapped attention runs as it
would without the adapter.

Two attention layouts are supported:

* :class:`RotaryAttention` — separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` and
  rotary embeddings passed in as ``position_embeddings=(cos, sin)`` (Llama, Mistral,
  Mixtral, Qwen2, ...);
* :class:`FusedQKVAttention` — GPT-2's ``c_attn``, which projects queries, keys and values in
  one go. As in HF PEFT, the prompt term is added after ``c_proj`` without passing through
  it, so a checkpoint means the same in both libraries.

Checkpoint keys and shapes are HF PEFT's: ``<attention>.adaption_prompt`` and
``<attention>.adaption_gate``. The prompt term is no weight change, so it cannot be merged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel import AdapterLayer
from peft_kernel.layer import base_layer_dtype

MERGE_REFUSAL = ("an adaption prompt adds an attention term over its own prompt, which no change of the base "
                 "weights can express; keep the adapter unmerged (unload() removes it)")


class AdaptedAttention(AdapterLayer):
    """Bookkeeping and the gated prompt attention; subclasses read the wrapped attention's
    projections (:meth:`queries`, :meth:`prompt_keys_values`, :meth:`project_output`)."""

    adapter_layer_names = ("adaption_prompt", "adaption_gate")
    # the wrapped attention's keyword inputs (rotary tables, masks) cover the whole batch
    supports_mixed_batch = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        self.register_containers(*self.adapter_layer_names, container=nn.ParameterDict)
        attention = self.get_base_layer()
        head_dim = int(attention.head_dim)
        self.set_plain_attributes(head_dim=head_dim, scaling=head_dim**-0.5)
        self.update_layer(adapter_name, config=config)

    # -- creation ---------------------------------------------------------------------

    def hidden_size(self) -> int:
        """Width of the attention's input, and so of the prompt vectors."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config=None, **kwargs: Any) -> None:
        dtype = base_layer_dtype(self.query_projection())
        if dtype is None or not dtype.is_floating_point:  # quantized: the prompt stays float
            dtype = torch.float32
        # one standard-normal draw per prompt, in the order HF PEFT makes them
        prompt = torch.empty(1, config.adapter_len, self.hidden_size(), dtype=dtype).normal_()
        self.adaption_prompt[adapter_name] = nn.Parameter(prompt)
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, dtype=dtype))

    # -- the wrapped attention's projections ------------------------------------------

    def query_projection(self) -> nn.Module:
        raise NotImplementedError

    def queries(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The attention's queries for ``x``: ``(batch, heads, length, head_dim)``. ``args`` /
        ``kwargs`` are the arguments the attention module was called with besides ``x``."""
        raise NotImplementedError

    def prompt_keys_values(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompt: each ``(1, kv_heads, adapter_len, head_dim)``."""
        raise NotImplementedError

    def project_output(self, mixed: torch.Tensor) -> torch.Tensor:
        """The prompt term ``(batch, length, heads · head_dim)`` in the attention's output space."""
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # transformers' decoder layers pass the hidden states by keyword
        if "hidden_states" in kwargs:
            args = (kwargs.pop("hidden_states"), *args)
        return super().forward(*args, **kwargs)

    def adapter_forward(self, x: torch.Tensor, result: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        output, *rest = result if isinstance(result, tuple) else (result,)  # any output arity
        queries = self.queries(x, *args, **kwargs)
        keys, values = self.prompt_keys_values(self.adaption_prompt[adapter_name].to(x.dtype))
        groups = queries.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        scores = torch.matmul(queries, keys.transpose(2, 3)) * self.scaling
        # softmax in float32 at least (as the base attention computes it)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        probs = probs.to(queries.dtype)
        gated = self.adaption_gate[adapter_name].to(queries.dtype) * probs
        mixed = torch.matmul(gated, values).transpose(1, 2).flatten(2)
        output = output + self.project_output(mixed).to(output.dtype)
        return (output, *rest) if isinstance(result, tuple) else output

    # -- merging ----------------------------------------------------------------------

    def merge_blocker(self) -> str | None:
        return MERGE_REFUSAL


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryAttention(AdaptedAttention):
    """Attention with separate q/k/v/o projections and rotary positions given as
    ``position_embeddings=(cos, sin)`` (Llama and the models built like it)."""

    def hidden_size(self) -> int:
        attention = self.get_base_layer()
        size = getattr(getattr(attention, "config", None), "hidden_size", None)
        return int(size) if size is not None else int(attention.k_proj.in_features)

    def query_projection(self) -> nn.Module:
        return self.get_base_layer().q_proj

    def queries(self, x, *args, **kwargs):
        positions = kwargs.get("position_embeddings", args[0] if args else None)
        if positions is None:
            raise ValueError(
                f"{type(self.get_base_layer()).__name__} was called without position_embeddings=(cos, sin); adaption "
                "prompt needs the rotary tables that transformers passes to Llama-style attention modules"
            )
        cos, sin = positions
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"rotary tables of width {cos.shape[-1]} for heads of width {self.head_dim}: partial "
                             "rotary embeddings are not supported by adaption prompt")
        queries = self.query_projection()(x)
        queries = queries.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over the heads
        return queries * cos + _rotate_half(queries) * sin

    def prompt_keys_values(self, prompt):
        attention = self.get_base_layer()
        length = prompt.shape[1]
        keys = attention.k_proj(prompt).view(1, length, -1, self.head_dim).transpose(1, 2)
        values = attention.v_proj(prompt).view(1, length, -1, self.head_dim).transpose(1, 2)
        return keys, values

    def project_output(self, mixed):
        o_proj = self.get_base_layer().o_proj
        projected = o_proj(mixed)
        bias = getattr(o_proj, "bias", None)
        return projected if bias is None else projected - bias


class FusedQKVAttention(AdaptedAttention):
    """GPT-2's attention: ``c_attn`` projects queries, keys and values at once, no positions."""

    def hidden_size(self) -> int:
        return int(self.get_base_layer().embed_dim)

    def query_projection(self) -> nn.Module:
        return self.get_base_layer().c_attn

    def queries(self, x, *args, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("adaption prompt does not support cross-attention")
        attention = self.get_base_layer()
        queries = attention.c_attn(x).split(attention.split_size, dim=-1)[0]
        return queries.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def prompt_keys_values(self, prompt):
        attention = self.get_base_layer()
        _, keys, values = attention.c_attn(prompt).split(attention.split_size, dim=-1)
        length = prompt.shape[1]
        return (keys.view(1, length, -1, self.head_dim).transpose(1, 2),
                values.view(1, length, -1, self.head_dim).transpose(1, 2))

    def project_output(self, mixed):
        return mixed  # HF PEFT's formulation for GPT-2: added after c_proj, unprojected


def attention_layer_class(module: nn.Module) -> type[AdaptedAttention] | None:
    """The adaption-prompt layer for an attention module, by its structure; ``None`` when
    its attention is not one these layers can reproduce."""
    if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
        # per-head query/key norms (Qwen3, Gemma 3) would have to be applied to the prompt keys too
        if hasattr(module, "q_norm") or hasattr(module, "k_norm"):
            return None
        return RotaryAttention
    if all(hasattr(module, name) for name in ("c_attn", "split_size", "head_dim", "embed_dim")):
        return None if getattr(module, "is_cross_attention", False) else FusedQKVAttention
    return None
