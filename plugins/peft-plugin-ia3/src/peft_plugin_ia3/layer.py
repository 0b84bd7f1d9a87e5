"""(IA)³ layers. Per adapter one vector ``ia3_l``:

    ordinary layer      y = l ⊙ base(x)       l has one entry per output feature / channel
    feed-forward layer  y = base(l ⊙ x)       l has one entry per input feature / channel

Several active adapters multiply. Merging is multiplicative as well: the weight's output
rows (ordinary) or input columns (feed-forward) are scaled by ``l``, and an ordinary
layer's bias too; unmerging divides them back out.

Vector shapes are HF PEFT's, so checkpoints load both ways: ``(out, 1)`` / ``(1, in)`` for
linear layers and ``(1, C, 1, …)`` for convolutions.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from peft_kernel import AdapterLayer, PeftWarning

#: the slot of the stacked vectors in ``AdapterLayer.kept`` (an object: no adapter name clashes)
_STACK = object()


class IA3Layer(AdapterLayer):
    """Bookkeeping shared by all (IA)³ layers; subclasses fix the vector layout.

    ``is_feedforward`` is a property of the layer, decided by the adapter that created it
    (as in HF PEFT, so every adapter of a layer has the same vector shape).
    """

    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, is_feedforward: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        self.ia3_l = nn.ParameterDict({})
        self.is_feedforward = bool(is_feedforward)
        self.fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
        self.update_layer(adapter_name, config=config, is_feedforward=is_feedforward)

    # -- creation ---------------------------------------------------------------------

    def vector_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config=None, is_feedforward: bool | None = None,
                     **kwargs: Any) -> None:
        if is_feedforward is not None and bool(is_feedforward) != self.is_feedforward:
            role = "feed-forward" if self.is_feedforward else "output-scaling"
            requested = "feed-forward" if is_feedforward else "output-scaling"
            warnings.warn(
                f"Adapter {adapter_name!r} treats this layer as {requested}"
                f", but it was created as {role} by an earlier adapter; (IA)³ keeps one role per layer, so "
                f"{adapter_name!r} is {role} here too.",
                PeftWarning,
                stacklevel=3,
            )
        # drawn from the global generator exactly like HF PEFT, so init_ia3_weights=False agrees too
        vector = torch.randn(self.vector_shape())
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        if getattr(config, "init_ia3_weights", True) and vector.device.type != "meta":
            with torch.no_grad():
                self.ia3_l[adapter_name].fill_(1.0)
        self.adapter_state_changed()

    # -- forward ----------------------------------------------------------------------

    def _scale(self, adapter_names: list[str]) -> torch.Tensor:
        scale = self.ia3_l[adapter_names[0]]
        for name in adapter_names[1:]:
            scale = scale * self.ia3_l[name]
        return self._broadcastable(scale)

    def _broadcastable(self, vector: torch.Tensor) -> torch.Tensor:
        """The vector in a shape that broadcasts against this layer's activations."""
        return vector.flatten()

    def _run_base_scaled(self, x: torch.Tensor, scale: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        scaled = x.to(scale.dtype) * scale.to(x.device)
        return self.base_layer(scaled.to(self._base_input_dtype(x)), *args, **kwargs)

    def _base_input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype

    def forward_active(self, x, adapter_names, *args, **kwargs):
        if not adapter_names:
            return self.base_layer(x, *args, **kwargs)
        scale = self._scale(adapter_names)
        if self.is_feedforward:
            return self._run_base_scaled(x, scale, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale.to(result.device)).to(result.dtype)

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        # used for mixed adapter batches: one adapter applied to a sub-batch
        scale = self._scale([adapter_name])
        if self.is_feedforward:
            return self._run_base_scaled(x, scale, *args, **kwargs).to(result.dtype)
        return (result * scale.to(result.device)).to(result.dtype)

    def batched_forward(self, x, row_adapter, adapter_names, *args, **kwargs):
        # a mixed batch in one pass: each row gathers its vector from a stack of the batch's
        # vectors (ones for rows without adapter) and is scaled like forward_active scales
        vectors = [self.ia3_l[name] for name in adapter_names]
        recording = torch.is_grad_enabled() and any(v.requires_grad for v in vectors)
        kept = {} if recording else self.kept(_STACK, vectors, adapter_names)
        if "stack" not in kept:
            if len({(v.dtype, v.device) for v in vectors}) > 1:
                kept["stack"] = None
            else:
                flat = [v.reshape(-1) for v in vectors]
                kept["stack"] = torch.stack(flat + [torch.ones_like(flat[0])])
        stack = kept["stack"]
        if stack is None:  # vectors in several dtypes or on several devices
            return None
        scale = self._per_row(stack.index_select(0, row_adapter.to(stack.device)), x.dim())
        if self.is_feedforward:
            return self._run_base_scaled(x, scale, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale.to(result.device)).to(result.dtype)

    def _per_row(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        """One vector per row, ``(rows, features)``, shaped to broadcast against a
        ``dim``-dimensional input or output of this layer (features last)."""
        return rows.view(rows.shape[0], *([1] * (dim - 2)), rows.shape[1])

    # -- merging ----------------------------------------------------------------------

    def weight_factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The vector shaped to multiply ``weight`` (the base weight, in its own layout)."""
        raise NotImplementedError

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        factor = self.weight_factor(adapter_name, weight).detach()
        return (weight * factor.to(weight.device)).to(weight.dtype)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        factor = _nonzero(self.weight_factor(adapter_name, weight).detach())
        return (weight / factor.to(weight.device)).to(weight.dtype)

    def merge_bias(self, adapter_name: str, sign: int) -> None:
        bias = getattr(self.get_base_layer(), "bias", None)
        if self.is_feedforward or bias is None:
            return  # scaling the input leaves the bias alone
        vector = self.ia3_l[adapter_name].detach().reshape(bias.shape).to(bias.device)
        with torch.no_grad():
            if sign > 0:
                bias.data = (bias.data * vector).to(bias.dtype)
            else:
                bias.data = (bias.data / _nonzero(vector)).to(bias.dtype)

    def __repr__(self) -> str:
        return "ia3." + super().__repr__()


def _nonzero(factor: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``factor`` with exact zeros replaced by ``eps``: a zero entry destroyed the weight
    it scaled, so unmerging cannot restore it (warned about)."""
    zero = factor == 0
    if bool(zero.any()):
        warnings.warn("An (IA)³ vector has zero entries; the weights they scaled cannot be restored by unmerging.",
                      PeftWarning, stacklevel=4)
        factor = torch.where(zero, torch.full_like(factor, eps), factor)
    return factor


class Linear(IA3Layer):
    """(IA)³ on nn.Linear, transformers Conv1D (``fan_in_fan_out``) and quantized linear layers."""

    def vector_shape(self) -> tuple[int, ...]:
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def weight_factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        vector = self.ia3_l[adapter_name]  # (out, 1) or (1, in): matches an (out, in) weight
        return vector.T if self.fan_in_fan_out else vector


class _ConvNd(IA3Layer):
    """(IA)³ on nn.Conv1d/2d/3d: one entry per output channel, or per input channel for
    feed-forward layers."""

    def vector_shape(self) -> tuple[int, ...]:
        spatial = self.get_base_layer().weight.dim() - 2
        channels = self.in_features if self.is_feedforward else self.out_features
        return (1, channels) + (1,) * spatial

    def _broadcastable(self, vector: torch.Tensor) -> torch.Tensor:
        return vector  # (1, C, 1, …) already lines up with (batch, C, *spatial)

    def _per_row(self, rows: torch.Tensor, dim: int) -> torch.Tensor:
        return rows.view(*rows.shape, *([1] * (dim - 2)))  # (batch, C, *spatial): channels second

    def _base_input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.get_base_layer().weight.dtype

    def weight_factor(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        vector = self.ia3_l[adapter_name].reshape(-1)
        extra = (1,) * (weight.dim() - 1)
        if not self.is_feedforward:
            return vector.reshape((-1,) + extra)  # scales output channels (dim 0)
        base = self.get_base_layer()
        # weight is (out, in / groups, *kernel): output channel o of group g sees input
        # channels g * (in / groups) + j, j < in / groups
        per_group_in = weight.shape[1]
        per_group_out = weight.shape[0] // base.groups
        group = torch.arange(weight.shape[0], device=vector.device) // per_group_out
        index = group[:, None] * per_group_in + torch.arange(per_group_in, device=vector.device)[None, :]
        return vector[index].reshape(weight.shape[:2] + (1,) * (weight.dim() - 2))


class Conv1d(_ConvNd):
    pass


class Conv2d(_ConvNd):
    pass


class Conv3d(_ConvNd):
    pass
