"""A LoRA variant for ``nn.Conv3d`` that replaces the built-in one: "(2+1)D" LoRA.

The built-in LoRA Conv3d puts the full ``kT×kH×kW`` kernel into ``lora_A`` and a 1×1×1
conv into ``lora_B``. Video models often factor a 3-D kernel into a temporal and a spatial
part instead; this layer does the same for the update::

    lora_A: Conv3d(in → r, kernel (kT, 1, 1))      temporal
    lora_B: Conv3d(r → out, kernel (1, kH, kW))    spatial

so ``ΔW[o, i, t, h, w] = s · Σ_r B[o, r, h, w] · A[r, i, t]``: a rank-r update whose kernel
is separable in time and space, with ``r·(in·kT + out·kH·kW)`` parameters instead of
``r·(in·kT·kH·kW + out)``. It is exactly mergeable.

Only the layer math differs from the built-in class, so it subclasses it and overrides
``make_factors`` and ``delta_weight``. Use it for one config::

    config.register_custom_module({nn.Conv3d: SeparableLoraConv3d})

or for every LoRA config in the process::

    peft_kernel.register_layer_mapping(nn.Conv3d, SeparableLoraConv3d, method="LORA")

Both take precedence over the LoRA plugin's own ``Conv3d``. Neither is saved with the
adapter: register again (or pass ``config=`` with the custom module) before loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_kernel.layer import unwrap_base_layer
from peft_plugin_lora import Conv3d


class SeparableLoraConv3d(Conv3d):
    def __init__(self, base_layer: nn.Conv3d, adapter_name: str, r: int = 0, lora_alpha: float = 1,
                 config=None, **kwargs: Any) -> None:
        conv = unwrap_base_layer(base_layer)  # in a mixed model, layers of other methods may wrap it
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SeparableLoraConv3d needs groups=1, zero padding and numeric padding")
        if getattr(config, "use_dora", False):
            raise ValueError("SeparableLoraConv3d does not support DoRA")
        super().__init__(base_layer, adapter_name, r=r, lora_alpha=lora_alpha, config=config, **kwargs)

    def make_factors(self, adapter_name: str, r: int, lora_bias: bool) -> None:
        base = self.get_base_layer()
        (kt, kh, kw), (st, sh, sw) = base.kernel_size, base.stride
        (pt, ph, pw), (dt, dh, dw) = base.padding, base.dilation
        self.lora_A[adapter_name] = nn.Conv3d(self.in_features, r, (kt, 1, 1), stride=(st, 1, 1),
                                              padding=(pt, 0, 0), dilation=(dt, 1, 1), bias=False)
        self.lora_B[adapter_name] = nn.Conv3d(r, self.out_features, (1, kh, kw), stride=(1, sh, sw),
                                              padding=(0, ph, pw), dilation=(1, dh, dw), bias=lora_bias)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        A = self.lora_A[adapter_name].weight[:, :, :, 0, 0]  # (r, in, kT)
        B = self.lora_B[adapter_name].weight[:, :, 0]  # (out, r, kH, kW)
        return torch.einsum("orhw,rit->oithw", B, A) * self.scaling[adapter_name]

    def __repr__(self) -> str:
        return "separable_" + super().__repr__()
