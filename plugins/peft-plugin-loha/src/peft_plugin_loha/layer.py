"""The LoHa layer. Per adapter, the weight delta is a Hadamard (element-wise) product of two
low-rank products, scaled by ``alpha / r``::

    ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b)      hada_w*_a: (out, r), hada_w*_b: (r, in)

Convolutions use the flattened weight, ``in = in_channels / groups · prod(kernel_size)``. With
``use_effective_conv2d`` a convolution whose kernel is larger than 1 uses the CP form instead::

    ΔW[o, i, h, w] = (alpha / r) · C1[o, i, h, w] · C2[o, i, h, w],
    Cn[o, i, h, w] = Σ_pq hada_tn[p, q, h, w] · hada_wn_a[p, o] · hada_wn_b[q, i]   (tucker_product)

with ``hada_tn`` (r, r, kh, kw) (``kw = 1`` for Conv1d), ``hada_wn_a`` (r, out) and ``hada_wn_b``
(r, in_channels / groups). Shapes, initialisation order and names are HF PEFT's, so checkpoints
and seeded initialisations agree. Forward, merging, quantized bases, dtypes and dropout are
the kernel's :class:`peft_kernel.WeightDeltaLayer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_kernel import WeightDeltaLayer
from peft_kernel.delta import tucker_core_shape, tucker_product


class LoHaLayer(WeightDeltaLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    other_param_names = ("r", "alpha")

    def update_layer(self, adapter_name: str, config, r: int = 8, alpha: float = 8, **kwargs) -> None:
        self.set_low_rank(adapter_name, config, r, alpha, rescale_rows=True)
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        out, fan_in, *kernel = self.delta_shape
        if config.use_effective_conv2d and math.prod(kernel) > 1:  # CP form
            core = tucker_core_shape(r, kernel)
            shapes = zip(self.adapter_layer_names, [(r, out), (r, fan_in)] * 2 + [core] * 2, strict=True)
        else:
            flat = fan_in * math.prod(kernel)
            shapes = zip(self.adapter_layer_names[:4], [(out, r), (r, flat)] * 2, strict=True)
        for name, shape in shapes:  # HF's order of random draws: w1_a, w1_b, w2_a, w2_b, t1, t2
            weight = getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shape))
            if name == "hada_w2_b" and config.init_weights:
                nn.init.zeros_(weight)  # ΔW = 0: the adapter starts as an identity
            else:
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def get_delta(self, adapter_name: str) -> torch.Tensor:
        w1_a, w1_b, w2_a, w2_b = (getattr(self, name)[adapter_name] for name in self.adapter_layer_names[:4])
        if adapter_name in self.hada_t1:
            return (tucker_product(self.hada_t1[adapter_name], w1_a, w1_b)
                    * tucker_product(self.hada_t2[adapter_name], w2_a, w2_b))
        return (w1_a @ w1_b) * (w2_a @ w2_b)

    def __repr__(self) -> str:
        return "loha." + super().__repr__()

