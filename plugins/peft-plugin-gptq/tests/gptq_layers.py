"""Build GPTQModel TorchLinear layers from float nn.Linear layers for the tests.

This is plain round-to-nearest quantization written straight into GPTQ's packed format
(no calibration data, no Hessian): enough to exercise a real GPTQ layer's forward and
dequantization on CPU.
"""

from __future__ import annotations

import torch
from torch import nn


def rtn_gptq_linear(lin: nn.Linear, bits: int = 4, group_size: int = 32, sym: bool = True):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    out_f, in_f = lin.weight.shape
    w = lin.weight.detach().float()
    groups = w.reshape(out_f, in_f // group_size, group_size)
    maxq = 2**bits - 1
    if sym:
        scale = 2 * groups.abs().amax(-1) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale)
    scale = scale.clamp(min=1e-8)
    layer = TorchLinear(
        bits=bits, group_size=group_size, sym=sym, desc_act=False,
        in_features=in_f, out_features=out_f, bias=lin.bias is not None, register_buffers=False,
    )
    half = nn.Linear(in_f, out_f, bias=lin.bias is not None).half()
    half.load_state_dict(lin.state_dict())
    layer.pack_block(half, scale, zero, torch.arange(in_f, dtype=torch.int32) // group_size)
    layer.post_init()
    return layer
