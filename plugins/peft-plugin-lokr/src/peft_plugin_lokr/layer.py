"""The LoKr layer. Per adapter, the weight delta is a Kronecker product of two factors, scaled
by ``alpha / r``::

    ΔW = (alpha / r) · W1 ⊗ W2        W1: (a, c), W2: (b, d, *kernel_size)

with ``out = a·b`` and ``in = c·d`` (``in / groups`` for convolutions) split by
:func:`factorization`; the kernel dimensions of a convolution belong to W2 alone,
``ΔW[(i, j), (l, m), *k] = W1[i, l] · W2[j, m, *k]``. Each factor is a full matrix
(``lokr_w1``, ``lokr_w2``) where ``r`` is at least half its larger side, else a rank-r product
(``lokr_w1_a @ lokr_w1_b`` only with ``decompose_both``; ``lokr_w2_a @ lokr_w2_b`` of shapes
(b, r), (r, d · prod(kernel_size))). With ``use_effective_conv2d`` a convolution whose kernel is
larger than 1 builds a low-rank W2 in CP form, ``W2 = tucker_product(lokr_t2, lokr_w2_a, lokr_w2_b)``
with ``lokr_t2`` (r, r, kh, kw) (``kw = 1`` for Conv1d), ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d).

Shapes, initialisation order and names are HF PEFT's, so checkpoints and seeded
initialisations agree. Forward, merging, quantized bases, dtypes and dropout are the
kernel's :class:`peft_kernel.WeightDeltaLayer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_kernel import WeightDeltaLayer
from peft_kernel.delta import tucker_core_shape, tucker_product


class LoKrLayer(WeightDeltaLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    other_param_names = ("r", "alpha")

    def update_layer(self, adapter_name: str, config, r: int = 8, alpha: float = 8, **kwargs) -> None:
        self.set_low_rank(adapter_name, config, r, alpha, rescale_rows=config.rank_dropout_scale)
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        out, fan_in, *kernel = self.delta_shape
        (a, b), (c, d) = factorization(out, config.decompose_factor), factorization(fan_in, config.decompose_factor)
        shapes = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)} if config.decompose_both and r < max(a, c) / 2 else {
            "lokr_w1": (a, c)}
        if r >= max(b, d) / 2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif config.use_effective_conv2d and math.prod(kernel) > 1:
            shapes.update(lokr_w2_a=(r, b), lokr_w2_b=(r, d), lokr_t2=tucker_core_shape(r, kernel))
        else:
            shapes.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        init = config.init_weights
        zeroed = {"lokr_w2", "lokr_w2_b"} if init == "lycoris" else {"lokr_w1", "lokr_w1_a"} if init else ()
        for name in self.adapter_layer_names:  # HF's order of random draws
            if name in shapes:
                weight = getattr(self, name)[adapter_name] = nn.Parameter(torch.empty(shapes[name]))
                if name in zeroed:
                    nn.init.zeros_(weight)  # ΔW = 0: the adapter starts as an identity
                else:
                    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))

    def get_delta(self, adapter_name: str) -> torch.Tensor:
        w1 = self._factor("lokr_w1", adapter_name)
        if adapter_name in self.lokr_t2:
            w2 = tucker_product(self.lokr_t2[adapter_name], self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        else:
            w2 = self._factor("lokr_w2", adapter_name)
        # ΔW[(i, j), (l, m), k] = W1[i, l] · W2[j, m, k] as (a, b, c, d, K), which is ΔW's element order
        # (broadcasting, not torch.kron: that fails on some strided inputs, e.g. a CP product)
        w2 = w2.reshape(w2.shape[0], self.delta_shape[1] // w1.shape[1], -1)
        return w1[:, None, :, None, None] * w2[None, :, None]

    def _factor(self, name: str, adapter_name: str) -> torch.Tensor:
        """A factor: the full matrix ``name`` or the product ``name_a @ name_b``."""
        full = getattr(self, name)
        if adapter_name in full:
            return full[adapter_name]
        return getattr(self, name + "_a")[adapter_name] @ getattr(self, name + "_b")[adapter_name]

    def __repr__(self) -> str:
        return "lokr." + super().__repr__()


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m · n = dimension``: ``(factor, dimension / factor)`` when ``factor`` divides
    ``dimension``; otherwise the divisor pair closest to the square root with ``m ≤ n``, among the
    divisors ``m`` not above ``factor`` (any, for ``-1``). LyCORIS's rule, which checkpoint shapes follow."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for candidate in range(2, min(limit, dimension) + 1):
        if dimension % candidate == 0:
            m = candidate
            if candidate * candidate >= dimension:
                break
    return min(m, dimension // m), max(m, dimension // m)
