"""VeRA layers. Per adapter, with the shared projections ``A`` (r × in_max) and ``B``
(out_max × r) sliced to this layer's size:

    h = W₀x + λ_b ⊙ (B[:out, :r] (λ_d ⊙ (A[:r, :in] dropout(x))))

``vera_lambda_b`` (out) and ``vera_lambda_d`` (r) are the only trainable tensors. The
projections live once on the tuner (``base_model.vera_A`` / ``vera_B``); each layer holds
a reference to the same :class:`peft_kernel.BufferDict`, attached by the tuner right after
the layer is created.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peft_kernel import AdapterLayer, BufferDict

# slots in AdapterLayer.kept (objects: no adapter name clashes with them)
_LAMBDAS, _SHARED = object(), object()


class VeraLayer(AdapterLayer):
    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")
    other_param_names = ("r", "vera_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config=None, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name=adapter_name, **kwargs)
        if self.in_features is None or self.out_features is None:
            raise TypeError(f"VeRA cannot tell the input/output size of {type(base_layer).__name__}")
        self.r: dict[str, int] = {}
        self.vera_dropout = nn.ModuleDict({})
        self.vera_lambda_b = nn.ParameterDict({})
        self.vera_lambda_d = nn.ParameterDict({})
        # shared projections, attached by the tuner (attach_projections)
        self.vera_A: BufferDict | None = None
        self.vera_B: BufferDict | None = None
        self.fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
        self.update_layer(adapter_name, config=config)

    # -- creation ---------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config=None, r: int | None = None, **kwargs: Any) -> None:
        r = r if r is not None else getattr(config, "r", 256)
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        dropout = getattr(config, "vera_dropout", 0.0)
        self.r[adapter_name] = r
        self.vera_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()
        lambda_b = torch.ones(self.out_features)
        lambda_d = torch.randn(r)  # global generator, as HF PEFT, so init_weights=False agrees too
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)
        if getattr(config, "init_weights", True) and lambda_d.device.type != "meta":
            with torch.no_grad():
                self.vera_lambda_b[adapter_name].zero_()
                self.vera_lambda_d[adapter_name].fill_(getattr(config, "d_initial", 0.1))
        if self.vera_A is not None:
            self.check_projections(adapter_name)
        self.adapter_state_changed()

    def attach_projections(self, vera_A: BufferDict, vera_B: BufferDict, adapter_name: str) -> None:
        """Point this layer at the tuner's shared projections and check they are big enough."""
        self.vera_A, self.vera_B = vera_A, vera_B
        self.check_projections(adapter_name)

    def check_projections(self, adapter_name: str) -> None:
        if adapter_name not in self.vera_A or adapter_name not in self.vera_B:
            raise ValueError(f"The shared VeRA projections have no entry for adapter {adapter_name!r}")
        A, B = self.vera_A[adapter_name], self.vera_B[adapter_name]
        r = self.r[adapter_name]
        for what, have, need in (("vera_A", A.shape[1], self.in_features), ("vera_B", B.shape[0], self.out_features),
                                 ("vera_A", A.shape[0], r), ("vera_B", B.shape[1], r)):
            if have < need:
                raise ValueError(
                    f"{what} has size {have} but this layer needs at least {need}: the projections were sized by the "
                    f"first VeRA adapter, and adapter {adapter_name!r} has larger layers or a larger r. Add the "
                    "adapter with the largest layers and r first."
                )

    # -- math -------------------------------------------------------------------------

    def projections(self, adapter_name: str, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:r, :in]`` and ``B[:out, :r]`` for this layer (only the slice is moved)."""
        r = self.r[adapter_name]
        A = self.vera_A[adapter_name][:r, : self.in_features]
        B = self.vera_B[adapter_name][: self.out_features, :r]
        return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)

    def adapter_forward(self, x, result, adapter_name, *args, **kwargs):
        lambda_d, lambda_b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        A, B = self.projections(adapter_name, device=x.device, dtype=lambda_d.dtype)
        x = x if x.dtype == lambda_d.dtype else x.to(lambda_d.dtype)
        hidden = lambda_d * F.linear(self.vera_dropout[adapter_name](x), A)
        return (result + lambda_b * F.linear(hidden, B)).to(result.dtype)

    def batched_forward(self, x, row_adapter, adapter_names, *args, **kwargs):
        # a mixed batch in one pass when the batch's adapters share their projections (all
        # adapters draw them from one projection_prng_key: equal for equal r): x·Aᵀ once for
        # all rows, then each row's λ_d and λ_b gathered from stacks (zeros for rows without
        # adapter). The cost is that of one adapter. Other projections or active dropout: None.
        for name in adapter_names:
            dropout = self.vera_dropout[name]
            if not (type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.training)):
                return None
        if not self._projections_shared(adapter_names):
            return None
        lambdas_d = [self.vera_lambda_d[name] for name in adapter_names]
        lambdas_b = [self.vera_lambda_b[name] for name in adapter_names]
        tensors = lambdas_d + lambdas_b
        if len({(t.dtype, t.device) for t in tensors}) > 1:
            return None
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        kept = {} if recording else self.kept(_LAMBDAS, tensors, adapter_names)
        if "stacks" not in kept:
            kept["stacks"] = tuple(torch.stack(lambdas + [torch.zeros_like(lambdas[0])])
                                   for lambdas in (lambdas_d, lambdas_b))
        stack_d, stack_b = kept["stacks"]
        A, B = self.projections(adapter_names[0], device=x.device, dtype=stack_d.dtype)
        result = self.base_layer(x, *args, **kwargs)
        inputs = x if x.dtype == stack_d.dtype else x.to(stack_d.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # one row's λ against (rows, …, features)
        hidden = F.linear(inputs, A) * stack_d.index_select(0, row_adapter).view(shape)
        update = F.linear(hidden, B) * stack_b.index_select(0, row_adapter).view(shape)
        return (result + update).to(result.dtype)

    def _projections_shared(self, adapter_names: tuple[str, ...]) -> bool:
        """Whether the adapters' projection slices for this layer hold the same values (each
        pair compared once, then kept until one of its projections changes)."""
        first = adapter_names[0]
        for name in adapter_names[1:]:
            if self.r[name] != self.r[first]:
                return False
            tensors = (self.vera_A[first], self.vera_B[first], self.vera_A[name], self.vera_B[name])
            kept = self.kept((_SHARED, first, name), tensors, in_training=True)
            if "shared" not in kept:
                (A, B), (other_A, other_B) = self.projections(first), self.projections(name)
                kept["shared"] = torch.equal(A, other_A) and torch.equal(B, other_B)
            if not kept["shared"]:
                return False
        return True

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        lambda_d, lambda_b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        dtype = lambda_d.dtype
        compute = torch.float32 if lambda_d.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype
        A, B = self.projections(adapter_name, device=lambda_d.device, dtype=compute)
        delta = (lambda_b.to(compute)[:, None] * B) @ (lambda_d.to(compute)[:, None] * A)  # (out, in)
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(dtype)

    def __repr__(self) -> str:
        return "vera." + super().__repr__()


class Linear(VeraLayer):
    """VeRA on nn.Linear, transformers Conv1D (``fan_in_fan_out``) and quantized linear layers."""
