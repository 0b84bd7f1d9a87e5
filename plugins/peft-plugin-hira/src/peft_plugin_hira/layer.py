"""The HiRA layer. Per adapter, a low-rank matrix multiplies the frozen weight element-wise::

    ΔW = W₀ ⊙ (B A)       A = hira_A: (r, in),  B = hira_B: (out, r)

so that ``W₀ + ΔW = W₀ ⊙ (1 + B A)``: the update follows W₀'s structure and can reach its full
rank. Convolutions use ``A`` (r, in / groups, *kernel_size) and ``B`` (out, r, 1, …) — B A is
then a 1×…×1 convolution of the two, the shape of the kernel; embeddings use
``hira_embedding_A`` (r, num_embeddings) and ``hira_embedding_B`` (embedding_dim, r) on the
embedding table read as a linear map. W₀ is read through :func:`peft_kernel.quant.base_weight`
(dequantized for quantized bases). Several adapters all multiply W₀, also when merged one
after another: the weight from before the first merge is kept (on the CPU) until the last
unmerge, which restores it exactly.

Names, shapes and the initialisation (both factors drawn from N(0, 1), then A re-initialised
and B zeroed, as HF PEFT does) are HF PEFT's. Forward, merging, dtypes and the input dropout are
the kernel's :class:`peft_kernel.WeightDeltaLayer`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peft_kernel import WeightDeltaLayer, quant


class HiraLayer(WeightDeltaLayer):
    adapter_layer_names = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")
    other_param_names = ("r",)

    def update_layer(self, adapter_name: str, config, r: int = 32, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
        self.r[adapter_name] = r
        self.input_dropout[adapter_name] = config.hira_dropout
        out, fan_in, *kernel = self.delta_shape
        embedding = self.base_kind == "embedding"
        a = self._factors("A")[adapter_name] = nn.Parameter(torch.empty(r, fan_in, *kernel))
        b = self._factors("B")[adapter_name] = nn.Parameter(torch.empty(out, r, *[1] * len(kernel)))
        nn.init.normal_(a)
        nn.init.normal_(b)
        init = config.init_weights
        if embedding and init is not False:
            nn.init.zeros_(a)  # ΔW = 0: the adapter starts as an identity
            nn.init.normal_(b)
        elif not embedding and init:
            if init is True or kernel:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            else:  # "gaussian"
                nn.init.normal_(a, std=1 / r)
            nn.init.zeros_(b)  # ΔW = 0: the adapter starts as an identity

    def _factors(self, name: str) -> nn.ParameterDict:
        return getattr(self, f"hira_embedding_{name}" if self.base_kind == "embedding" else f"hira_{name}")

    def get_delta(self, adapter_name: str) -> torch.Tensor:
        low_rank = self._factors("B")[adapter_name].flatten(1) @ self._factors("A")[adapter_name].flatten(1)
        return self._frozen_weight(low_rank.device) * low_rank.view(self.delta_shape)

    def _frozen_weight(self, device: torch.device) -> torch.Tensor:
        """W₀ in the canonical layout: the base weight, or while adapters are merged the one from before."""
        if self.merged_adapters:
            return self.__dict__["_weight_before_merge"].to(device)
        return self.canonical(quant.base_weight(self.get_base_layer()))

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if not self.merged_adapters:
            self.__dict__["_weight_before_merge"] = self.canonical(weight).detach().to("cpu", copy=True)
        return super().merge_weight(weight, adapter_name)

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if self.merged_adapters:
            return super().unmerge_weight(weight, adapter_name)
        before = self.__dict__.pop("_weight_before_merge")  # the last one out: exactly the weight from before
        return self.to_storage(before).to(weight.device, weight.dtype)

    def __repr__(self) -> str:
        return "hira." + super().__repr__()
