"""The layer: chosen rows of an embedding-like weight replaced by trainable ones.

An adapter stores the rows it trains (``trainable_tokens_delta``, despite the name the rows
themselves, not a difference) and a copy of the rows they replace (``trainable_tokens_original``,
not saved). The forward runs the base layer with a weight whose rows are swapped, so the base's
own forward (padding index, max norm, an embedding scale, a bias) stays in charge. Storing rows
rather than differences keeps resized-then-reinitialised vocabularies well defined: loading an
adapter always yields the trained rows, whatever the base holds there.

A *tied* layer wraps a module that shares its weight with the input embeddings (an output head)
and reads the adapters of the embeddings' layer: it holds no tensors of its own and saves none.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peft_kernel import AdapterLayer, BufferDict
from peft_kernel.layer import substituted_parameter
from peft_kernel.quant import base_weight

from .config import check_token_indices


class TrainableTokensLayer(AdapterLayer):
    """Rows ``token_indices[name]`` of the base weight (rows = tokens) are trainable per adapter."""

    adapter_layer_names = ("trainable_tokens_delta",)
    other_param_names = ("token_indices", "trainable_tokens_original")

    def __init__(self, base_layer: nn.Module, adapter_name: str | None = None, config=None, **kwargs) -> None:
        super().__init__(base_layer, adapter_name)
        self.register_containers("trainable_tokens_delta", container=nn.ParameterDict)
        self.register_containers("trainable_tokens_original", container=BufferDict)
        self.set_plain_attributes(token_indices={})
        if adapter_name is not None:
            self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config=None, token_indices: Iterable[int] | None = None,
                     init_weights: bool | None = None, **kwargs) -> None:
        """Add ``adapter_name`` training rows ``token_indices`` (default: ``config.token_indices``);
        they start as the current rows, or random with ``init_weights=False``."""
        if token_indices is None:
            token_indices = config.token_indices
        if init_weights is None:
            init_weights = getattr(config, "init_weights", True)
        weight = base_weight(self.get_base_layer())
        indices = check_token_indices(token_indices, "token_indices")
        out_of_range = [i for i in indices if i >= weight.shape[0]]
        if out_of_range:
            raise ValueError(f"token ids {out_of_range[:5]} are out of range for a weight of {weight.shape[0]} rows; "
                             "resize the embeddings first (model.resize_token_embeddings) or fix the ids")
        originals = weight.detach()[indices].clone()
        shape = (len(indices), weight.shape[1])
        if torch.empty(0).device.type == "meta":  # low_cpu_mem_usage: the rows come from a checkpoint
            rows = torch.empty(shape, dtype=weight.dtype)
        elif init_weights:
            rows = originals.clone()
        else:
            rows = torch.randn(shape, dtype=weight.dtype, device=weight.device)
        self.token_indices[adapter_name] = indices
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(rows)
        self.trainable_tokens_original[adapter_name] = originals

    def delete_adapter(self, adapter_name: str) -> None:
        self.token_indices.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # -- the rows ------------------------------------------------------------------------------

    def check_disjoint(self, adapter_names: Iterable[str]) -> None:
        """Two adapters (merged ones included) may not train the same token: which rows would win is
        undefined. Raises ``ValueError`` naming the adapter that overlaps."""
        seen: set[int] = set()
        for name in dict.fromkeys([*self.merged_adapters, *adapter_names]):
            indices = set(self.token_indices.get(name, ()))
            if seen & indices:
                raise ValueError(f"Adapter {name!r} trains tokens {sorted(seen & indices)[:5]} that another active or "
                                 "merged adapter of this layer trains too; activate adapters with disjoint tokens only")
            seen |= indices

    def _replace_rows(self, weight: torch.Tensor, adapter_name: str, rows: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(self.token_indices[adapter_name], device=weight.device, dtype=torch.long)
        return weight.index_copy(0, index, rows.to(weight))

    def merged_weight(self, adapter_names: Iterable[str]) -> torch.Tensor:
        """The base weight with the rows of ``adapter_names`` swapped in (differentiable in the rows)."""
        weight = base_weight(self.get_base_layer())
        for name in adapter_names:
            weight = self._replace_rows(weight, name, self.trainable_tokens_delta[name])
        return weight

    # -- forward ------------------------------------------------------------------------------

    def forward_active(self, x, adapter_names, *args, **kwargs):
        if not adapter_names:
            return self.base_layer(x, *args, **kwargs)
        self.check_disjoint(adapter_names)
        with substituted_parameter(self.get_base_layer(), "weight", self.merged_weight(adapter_names)):
            return self.base_layer(x, *args, **kwargs)

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        # the rows replace part of the weight, so one adapter's output is computed afresh (mixed batches)
        return self.forward_active(x, [adapter_name], *args, **kwargs)

    # -- merging -------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names) if self.has_adapter(n)]
        self.check_disjoint(names)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._replace_rows(weight, adapter_name, self.trainable_tokens_delta[adapter_name].detach())

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._replace_rows(weight, adapter_name, self.trainable_tokens_original[adapter_name])

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Merging swaps rows in; as a difference: the new rows minus the base's, zero elsewhere."""
        weight = base_weight(self.get_base_layer()).detach()
        return self.merge_weight(weight, adapter_name) - weight

    # -- combining (add_weighted_adapter) ---------------------------------------------------------

    @torch.no_grad()
    def combine_rows(self, adapter_name: str, sources: list[str], weights: list[float], combination=None,
                     **options) -> None:
        """Set the rows of ``adapter_name`` (a new adapter whose tokens include every source's) to
        the rows they replace plus the combination of the sources' changes: each source's change is
        its rows minus the rows they replaced, zero on tokens it does not train; combined by their
        weighted sum, or by ``combination.fn(changes, weights, **options)`` (a registered strategy:
        TIES, DARE, ...)."""
        position = {token: i for i, token in enumerate(self.token_indices[adapter_name])}
        base = self.trainable_tokens_original[adapter_name]
        changes = []
        for name in sources:
            missing = [t for t in self.token_indices[name] if t not in position]
            if missing:
                raise ValueError(f"adapter {adapter_name!r} does not train tokens {missing[:5]} of source {name!r}")
            change = torch.zeros_like(base)
            rows = [position[t] for t in self.token_indices[name]]
            change[rows] = (self.trainable_tokens_delta[name] - self.trainable_tokens_original[name]).to(base)
            changes.append(change)
        if combination is None:
            combined = sum((w * change for w, change in zip(weights, changes, strict=True)), torch.zeros_like(base))
        else:
            combined = combination.fn(changes, torch.tensor(weights, device=base.device), **options).to(base)
        self.trainable_tokens_delta[adapter_name].copy_(base + combined)


class TiedTrainableTokensLayer(TrainableTokensLayer):
    """Wraps a module that shares the input embeddings' weight (e.g. a tied output head) and
    applies the adapters of the embeddings' layer ``tied_to``, whose containers it shares.

    ``saved``: whether checkpoints list the shared rows under this layer's name too (HF PEFT's
    TrainableTokens checkpoints do, its LoRA ones do not); either way they load into one tensor.
    """

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokensLayer, adapter_name: str | None = None,
                 saved: bool = True) -> None:
        AdapterLayer.__init__(self, base_layer, adapter_name)
        self.trainable_tokens_delta = tied_to.trainable_tokens_delta
        self.trainable_tokens_original = tied_to.trainable_tokens_original
        self.set_plain_attributes(token_indices=tied_to.token_indices, _tied_to=tied_to)
        if not saved:  # the containers stay registered (and move with the model) but are not listed
            self.set_plain_attributes(adapter_layer_names=(), other_param_names=())

    @property
    def tied_to(self) -> TrainableTokensLayer:
        return self._tied_to

    def update_layer(self, adapter_name: str, config=None, **kwargs) -> None:
        """Nothing to create: the rows live in the embeddings' layer."""

    def has_adapter(self, adapter_name: str) -> bool:
        return self._tied_to.has_adapter(adapter_name)

    def merge_parameters(self) -> list[nn.Parameter]:
        return []  # the embeddings' layer merges into the shared weight; swapping the same rows again is a no-op

    def combine_rows(self, *args, **kwargs) -> None:
        """Nothing to do: the embeddings' layer combines the shared rows."""
