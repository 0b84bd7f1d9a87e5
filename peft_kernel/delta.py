"""Layers for methods that change the base weight: ``W + s·ΔW`` or ``T(W)``.

Most PEFT methods are defined by what they do to the weight of the layer they adapt: a
weight delta ΔW built from the method's parameters (Hadamard or Kronecker products of
factors, a sparse or spectral update, ...) or a transform of W (an orthogonal rotation,
a rescaling). :class:`WeightDeltaLayer` runs everything else, so a method writes only
its parameters and that one piece of math.

The contract
============

Subclass :class:`WeightDeltaLayer` and give it:

``adapter_layer_names``
    names of the per-adapter trainable containers (saved in checkpoints). The base
    creates an ``nn.ParameterDict`` for each (``container_types`` names other types, e.g.
    ``{"foo_R": nn.ModuleDict}``); each name of ``other_param_names`` becomes a plain
    ``dict`` (per-adapter settings such as ``r``).

``update_layer(adapter_name, config=None, **layer_kwargs)``
    create one adapter's tensors, sized from :attr:`WeightDeltaLayer.delta_shape`, and
    set its entries in the per-adapter settings the base keeps (all optional):

    * ``self.scaling[name]`` — the delta is multiplied by it (default 1);
    * ``self.module_dropout[name]`` — in training, the adapter is skipped for a whole
      call with this probability. Setting it (even to 0.0) draws one uniform number per
      adapter and training call from torch's global generator, as LyCORIS-style layers do;
    * ``self.row_dropout[name]`` and ``self.row_dropout_rescale[name]`` — in training, each
      output row of ΔW is zeroed with this probability (what LyCORIS calls rank dropout),
      and with ``row_dropout_rescale`` the kept rows are divided by the kept fraction;
    * ``self.input_dropout[name]`` — in training, the adapter's part ``op(x, s·ΔW)`` sees
      ``x`` through dropout with this probability (additive methods, floating-point inputs:
      an embedding's indices are never dropped), so each adapter then runs its own
      operation instead of one fused one.

    ``layer_kwargs`` are ``config.layer_kwargs(target_name)``. The constructor calls
    ``update_layer`` for the first adapter; the kernel calls it for every further one and
    afterwards moves the new tensors to the base layer's device, keeps them in fp32 on
    half-precision bases and calls ``adapter_state_changed()``. Tensors are created on
    the meta device for ``low_cpu_mem_usage``: initialise them in place
    (``nn.init.*``), which is a no-op there.

and then *one* of:

``get_delta(adapter_name) -> Tensor`` (additive methods)
    ΔW before scaling, in the canonical layout ``delta_shape`` = ``(out, in)`` for linear
    layers (whatever their storage: transformers ``Conv1D`` keeps ``(in, out)``, the kernel
    transposes), ``(out, in / groups, *kernel_size)`` for convolutions and
    ``(embedding_dim, num_embeddings)`` for embeddings (the embedding as a linear map of
    one-hot inputs). Any tensor with that many elements in that order is reshaped to it,
    so ``(out, in / groups · prod(kernel_size))`` works for convolutions too. It must be
    deterministic: training-time randomness is the base's (``module_dropout``,
    ``row_dropout``), so merging and gradient checks see the exact delta.

``transform_weight(weight, adapter_name)`` and ``untransform_weight(weight, adapter_name)``
    (multiplicative and other methods) map the weight, in the canonical layout, to the
    adapted weight and back (the inverse is what unmerging uses). Several active
    adapters are applied in order, and unmerged in reverse. A method that also changes
    the bias overrides ``transform_bias(bias, adapter_name)`` / ``untransform_bias``
    (``bias`` is ``None`` for layers without one; where the method then still makes a
    bias, the layer cannot merge, since there is no bias to write into). Training-time
    randomness of a transform (e.g. dropping rotation blocks) goes into
    ``training_transform_weight(weight, adapter_name)``, which the forward pass calls in
    training mode instead (default: ``transform_weight``); merging always uses the exact
    ``transform_weight``.

A transform of the form ``T(W) = L·W·R`` can also run on the activations, which is cheaper than
building T(W) on every call. Such a method makes the property ``transforms_activations`` true
(per layer: e.g. only for linear bases) and overrides either or both of

``transform_input(x, adapter_name)``
    the input the base layer needs to compute the adapted layer: ``x·Rᵀ`` for a linear layer
    (default: ``x``);
``transform_output(y, adapter_name)``
    the base layer's output (bias included; read :attr:`bias`) mapped to the adapted output,
    ``L`` applied to the bias-free part (default: ``y``).

Both return their input's dtype and apply training-time randomness themselves (they run only
in the forward pass). The forward pass is then ``transform_output(base_layer(transform_input(x)))``;
with several adapters the input maps run last adapter first and the output maps first adapter
first, which is ``Tₙ(…T₁(W))`` again. Nothing the size of W is built, a quantized base is not
dequantized and an adapter layer nested inside keeps working. Merging keeps using
``transform_weight``.

What the base does
==================

* **Supported base layers**: ``nn.Linear``, transformers ``Conv1D``, quantized linear layers
  (any :mod:`peft_kernel.quant` backend), ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` (any
  groups, stride, padding, dilation and ``padding_mode``) and ``nn.Embedding``
  (``padding_idx``, ``scale_grad_by_freq``; ``max_norm`` stays the base layer's own
  renormalisation of its stored weight). :attr:`base_kind` says which
  (``"linear"``, ``"conv"``, ``"embedding"``); anything else is a ``TypeError`` at creation.
* **Forward, additive**: ``base(x) + op(x, Σ sᵢ·ΔWᵢ)`` with the base layer's own operation
  ``op`` (:meth:`apply_weight`) and no bias, the deltas of all active adapters summed
  first. On a plain float ``nn.Linear`` / ``Conv1D`` / ``Conv*d`` whose dtype matches
  the adapters' and the input's, it computes ``op(x, W + Σ sᵢ·ΔWᵢ) + b`` instead: one
  matrix product instead of two, forward and backward. Quantized bases are never
  dequantized in the forward pass.
* **Forward, transforms**: ``op(x, Tₙ(…T₁(W)), Tₙ(…T₁(b)))`` with W read through
  :func:`peft_kernel.quant.base_weight` (dequantized when quantized), or, for layers that
  ``transforms_activations``, the base layer's own call between the activation maps.
* **dtypes**: adapters stay fp32 on half-precision bases; the input is cast to the
  adapters' dtype for the adapter's part and the result back to the base's dtype.
* **Merging**: ``W ← W + s·ΔW`` (computed in the wider of the two dtypes, rounded once) or
  ``W ← T(W)``, through :func:`peft_kernel.quant.set_base_weight` (requantized);
  unmerging subtracts or applies the inverse, newest first; ``safe_merge`` checks for
  NaN/inf before anything changes. :meth:`delta_weight` is the scaled delta in the base
  weight's storage layout.
* Everything :class:`peft_kernel.AdapterLayer` does: several adapters, mixed adapter
  batches (``adapter_names=``), disable / enable, delete, checkpoints, meta-device init.

A method may still override ``adapter_forward`` / ``forward_active`` when it has a cheaper
exact forward (e.g. a transform that acts on the output only); merging keeps using the
weight math above.

Factorised convolution kernels
==============================

:func:`tucker_product` and :func:`tucker_core_shape` build a convolution weight from a small
core and one factor per channel mode (Tucker-2, the "CP form" / "effective conv" of
several low-rank methods), for methods that offer it: one implementation, differentiated
by autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .dispatch import is_linear_like, stores_weight_transposed, transformers_conv1d
from .layer import AdapterLayer, plain_call

#: the convolutions a weight-delta layer adapts (linear-like layers are recognised by dispatch)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def base_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv"`` or ``"embedding"`` for the layers :class:`WeightDeltaLayer`
    can adapt (``nn.Linear``, transformers ``Conv1D``, quantized linear layers;
    ``nn.Conv1d/2d/3d``; ``nn.Embedding``), else ``None``."""
    if isinstance(module, _CONV):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_linear_like(module):
        return "linear"
    return None


class WeightDeltaLayer(AdapterLayer):
    """Base of layers whose method defines ΔW (``get_delta``) or a weight transform
    (``transform_weight``); see the module docstring for the contract."""

    #: per-adapter containers that are neither ParameterDicts (``adapter_layer_names``) nor
    #: plain dicts (``other_param_names``): ``{name: container type}``
    container_types: dict[str, type] = {}

    def __init__(self, base_layer: nn.Module, adapter_name: str | None = None, config=None, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name)
        base = self.get_base_layer()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(
                f"{type(self).__name__} cannot adapt {type(base).__name__}: a weight-delta layer needs nn.Linear, "
                "transformers Conv1D, a quantized linear layer, nn.Conv1d/2d/3d or nn.Embedding"
            )
        shape = tuple(base.weight.shape) if kind == "conv" else (self.out_features, self.in_features)
        self.set_plain_attributes(
            base_kind=kind, delta_shape=shape, scaling={}, module_dropout={}, row_dropout={}, row_dropout_rescale={},
            input_dropout={},
            _transposed=kind == "embedding" or stores_weight_transposed(base),
            **{name: {} for name in self.other_param_names if name not in self.container_types},
        )
        by_type: dict[type, list[str]] = {}
        for name in dict.fromkeys(self.adapter_layer_names + tuple(self.container_types)):
            by_type.setdefault(self.container_types.get(name, nn.ParameterDict), []).append(name)
        for container, names in by_type.items():
            self.register_containers(*names, container=container)
        if adapter_name is not None:
            self.update_layer(adapter_name, config=config, **kwargs)

    # -- what the method supplies -------------------------------------------------------

    def get_delta(self, adapter_name: str) -> torch.Tensor:
        """ΔW of one adapter before scaling, in the canonical layout (``delta_shape``)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither get_delta nor transform_weight")

    def transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The adapted weight for ``weight`` (canonical layout). Overriding it makes the
        layer a transform layer: ``get_delta`` is then unused."""
        raise NotImplementedError

    def untransform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The inverse of :meth:`transform_weight` (for unmerging)."""
        raise NotImplementedError(f"{type(self).__name__} cannot unmerge: untransform_weight is not implemented")

    def training_transform_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """:meth:`transform_weight` as a forward pass in training mode uses it: override it for
        training-time randomness (merging always uses ``transform_weight``). Default: the same."""
        return self.transform_weight(weight, adapter_name)

    @property
    def transforms_activations(self) -> bool:
        """Whether the forward pass runs the transform on the activations (:meth:`transform_input`,
        :meth:`transform_output`) instead of building T(W). Default: ``False``."""
        return False

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """For ``transforms_activations``: the input whose base-layer output is the adapted one
        (``x·Rᵀ`` for ``T(W) = L·W·R`` on a linear layer). Default: ``x``."""
        return x

    def transform_output(self, y: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """For ``transforms_activations``: the base layer's output (bias included) mapped to the
        adapted output (``L`` applied to its bias-free part). Default: ``y``."""
        return y

    def transform_bias(self, bias: torch.Tensor | None, adapter_name: str) -> torch.Tensor | None:
        """The adapted bias (``bias`` is ``None`` when the layer has none). Default: unchanged."""
        return bias

    def untransform_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The inverse of :meth:`transform_bias` (for unmerging)."""
        return bias

    @property
    def transforms_weight(self) -> bool:
        """Whether this layer's method is a weight transform (else it is additive)."""
        return type(self).transform_weight is not WeightDeltaLayer.transform_weight

    @property
    def changes_bias(self) -> bool:
        """Whether this layer's method changes the bias (it overrides ``transform_bias``)."""
        return type(self).transform_bias is not WeightDeltaLayer.transform_bias

    def set_low_rank(self, adapter_name: str, config, r: int, alpha: float, rescale_rows: bool) -> None:
        """The settings of a :class:`peft_kernel.LowRankDeltaConfig` adapter: ``scaling = alpha / r``
        (``r`` must be positive), module dropout, and the config's ``rank_dropout`` as row dropout
        (``rescale_rows``: the kept rows are divided by the kept fraction)."""
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.scaling[adapter_name], self.module_dropout[adapter_name] = alpha / r, config.module_dropout
        self.row_dropout[adapter_name], self.row_dropout_rescale[adapter_name] = config.rank_dropout, rescale_rows

    # -- layouts and the base layer's operation -------------------------------------------

    def canonical(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the base layer's storage layout, in the canonical layout (a view)."""
        return weight.T if self._transposed else weight

    def to_storage(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in the canonical layout, in the base layer's storage layout (a view)."""
        return weight.T if self._transposed else weight

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The base layer's operation on ``x`` with ``weight`` (canonical layout) and ``bias``
        in place of its own: a linear map, the convolution with the base's stride, padding,
        dilation, groups and padding mode, or the embedding lookup with its ``padding_idx``."""
        base = self.get_base_layer()
        if self.base_kind == "linear":
            return F.linear(x, weight, bias)
        if self.base_kind == "conv":
            return base._conv_forward(x, weight, bias)
        out = F.embedding(x, weight.T, base.padding_idx, None, base.norm_type, base.scale_grad_by_freq, False)
        return out if bias is None else out + bias

    def scaled_delta(self, adapter_name: str) -> torch.Tensor:
        """``scaling · ΔW`` of one adapter, canonical layout (no dropout)."""
        delta = self.get_delta(adapter_name).reshape(self.delta_shape)
        scale = self.scaling.get(adapter_name, 1.0)
        return delta if scale == 1 else delta * scale

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scaling · ΔW`` in the base weight's storage layout (what merging adds)."""
        if self.transforms_weight:
            raise NotImplementedError(f"{type(self).__name__} transforms the weight; it has no additive delta")
        return self.to_storage(self.scaled_delta(adapter_name))

    # -- forward ----------------------------------------------------------------------

    def _skipped(self, adapter_name: str) -> bool:
        """Module dropout: in training, skip the adapter for this call with its probability."""
        p = self.module_dropout.get(adapter_name)
        return p is not None and self.training and not float(torch.rand(1)) > p

    def _training_delta(self, adapter_name: str) -> torch.Tensor:
        """The scaled delta as the forward pass uses it (row dropout applied in training)."""
        delta = self.scaled_delta(adapter_name)
        p = self.row_dropout.get(adapter_name, 0.0)
        if self.training and p:
            keep = (torch.rand(delta.shape[0]) > p).to(delta.dtype)
            if self.row_dropout_rescale.get(adapter_name, False):
                keep = keep / keep.mean().clamp_min(torch.finfo(keep.dtype).tiny)  # all dropped: stays zero
            delta = delta * keep.to(delta.device).view(-1, *[1] * (delta.dim() - 1))
        return delta

    def _summed_delta(self, adapter_names: list[str]) -> torch.Tensor | None:
        total = None
        for name in adapter_names:
            if self._skipped(name):
                continue
            delta = self._training_delta(name)
            total = delta if total is None else total + delta
        return total

    def _transformed(self, adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        names = [name for name in adapter_names if not self._skipped(name)]
        if not names:
            return None
        base = self.get_base_layer()
        weight, bias = self.canonical(quant.base_weight(base)), getattr(base, "bias", None)
        transform = self.training_transform_weight if self.training else self.transform_weight
        for name in names:
            weight = transform(weight, name)
            bias = self.transform_bias(bias, name)
        return weight, bias

    def _forward_on_activations(self, x: torch.Tensor, adapter_names: list[str], *args, **kwargs) -> Any:
        names = [name for name in adapter_names if not self._skipped(name)]
        for name in reversed(names):  # Tₙ(…T₁(W)): the last adapter's input map acts first
            x = self.transform_input(x, name)
        result = self.base_layer(x, *args, **kwargs)
        for name in names:
            result = self.transform_output(result, name)
        return result

    def _apply_transformed(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out_dtype = x.dtype if x.is_floating_point() else weight.dtype
        if x.is_floating_point():
            x = x.to(weight.dtype)
        out = self.apply_weight(x, weight, None if bias is None else bias.to(weight.dtype))
        return out.to(out_dtype)

    def _add_delta(self, x: torch.Tensor, result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.dtype != delta.dtype:
            x = x.to(delta.dtype)
        return result + self.apply_weight(x, delta).to(result.dtype)

    def _fusable(self, x: torch.Tensor, delta: torch.Tensor) -> bool:
        """Whether ``op(x, W + ΔW) + b`` can replace ``base(x) + op(x, ΔW)``: a plain linear or
        convolution holding a plain tensor (not a quantized or sharded tensor subclass), called
        without hooks, in the input's and the delta's dtype."""
        base = self._modules["base_layer"]
        if type(base) not in (nn.Linear, *_CONV) and type(base) is not transformers_conv1d():
            return False
        weight = base.weight
        return (type(weight) in (nn.Parameter, torch.Tensor) and plain_call(base)
                and weight.dtype == x.dtype == delta.dtype and weight.device == delta.device)

    def forward_active(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> Any:
        if self.transforms_weight:
            if self.transforms_activations:
                return self._forward_on_activations(x, adapter_names, *args, **kwargs)
            transformed = self._transformed(adapter_names)
            if transformed is None:
                return self.base_layer(x, *args, **kwargs)
            return self._apply_transformed(x, *transformed)
        if self.training and x.is_floating_point() and any(self.input_dropout.get(name) for name in adapter_names):
            return super().forward_active(x, adapter_names, *args, **kwargs)  # one dropout draw per adapter
        delta = self._summed_delta(adapter_names)
        if delta is None:
            return self.base_layer(x, *args, **kwargs)
        if not args and not kwargs and self._fusable(x, delta):
            base = self.get_base_layer()
            return self.apply_weight(x, self.canonical(base.weight) + delta, base.bias)
        return self._add_delta(x, self.base_layer(x, *args, **kwargs), delta)

    def adapter_forward(self, x: torch.Tensor, result: torch.Tensor, adapter_name: str, *args, **kwargs):
        """One adapter on a (sub-)batch whose base output is ``result`` (mixed batches)."""
        if self.transforms_weight:
            if self.transforms_activations:
                return self._forward_on_activations(x, [adapter_name], *args, **kwargs).to(result.dtype)
            transformed = self._transformed([adapter_name])
            return result if transformed is None else self._apply_transformed(x, *transformed).to(result.dtype)
        delta = self._summed_delta([adapter_name])
        if delta is None:
            return result
        p = self.input_dropout.get(adapter_name, 0.0)
        if self.training and p and x.is_floating_point():
            x = F.dropout(x, p)
        return self._add_delta(x, result, delta)

    # -- merging ----------------------------------------------------------------------

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            if self.transforms_weight:
                return self.to_storage(self.transform_weight(self.canonical(weight), adapter_name)).to(weight.dtype)
            return (weight + self.delta_weight(adapter_name).to(weight.device)).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            if self.transforms_weight:
                return self.to_storage(self.untransform_weight(self.canonical(weight), adapter_name)).to(weight.dtype)
            return (weight - self.delta_weight(adapter_name).to(weight.device)).to(weight.dtype)

    def merge_bias(self, adapter_name: str, sign: int) -> None:
        bias = getattr(self.get_base_layer(), "bias", None)
        if not self.changes_bias or bias is None:
            return
        with torch.no_grad():
            new = self.transform_bias(bias, adapter_name) if sign > 0 else self.untransform_bias(bias, adapter_name)
            bias.data = new.to(bias.dtype)

    def nesting_blocker(self) -> str | None:
        if self.transforms_weight and not self.transforms_activations:
            return (f"{type(self).__name__} builds T(W) from the base weight alone, so it cannot act through the "
                    "layers of other methods inside it. Add this adapter before the others (its layer then sits "
                    "inside theirs), or give the layer the activation form (transforms_activations)")
        return None

    def merge_blocker(self) -> str | None:
        if self.changes_bias and getattr(self.get_base_layer(), "bias", None) is None:
            with torch.no_grad():  # a transform that keeps a missing bias missing (e.g. a rotation) merges
                makes_bias = any(self.transform_bias(None, name) is not None
                                 for name in self._all_available_adapter_names() if self.has_adapter(name))
            if makes_bias:
                return f"{type(self).__name__} changes the bias and this layer has none to merge it into"
        return super().merge_blocker()

    # -- bookkeeping --------------------------------------------------------------------

    def delete_adapter(self, adapter_name: str) -> None:
        for settings in (self.scaling, self.module_dropout, self.row_dropout, self.row_dropout_rescale,
                         self.input_dropout):
            settings.pop(adapter_name, None)
        super().delete_adapter(adapter_name)


# -- factorised convolution kernels ---------------------------------------------------------


def tucker_core_shape(rank: int, kernel_size: tuple[int, ...]) -> tuple[int, ...]:
    """The core's shape for :func:`tucker_product` of rank ``rank`` and a convolution kernel:
    ``(rank, rank, *kernel_size)``, with a 1-D kernel ``k`` kept as ``(k, 1)`` (the layout
    LyCORIS-format checkpoints use for Conv1d)."""
    return (rank, rank, kernel_size[0], 1) if len(kernel_size) == 1 else (rank, rank, *kernel_size)


def tucker_product(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A convolution weight from its Tucker-2 factors::

        W[o, i, *k] = Σ_pq core[p, q, *k] · out_factor[p, o] · in_factor[q, i]

    ``core`` (r, r, *kernel), ``out_factor`` (r, out), ``in_factor`` (r, in / groups); the result is
    (out, in / groups, *kernel) (reshape a Conv1d's trailing 1 away, or let
    :class:`WeightDeltaLayer` do it)."""
    return torch.einsum("pq...,po,qi->oi...", core, out_factor, in_factor)
