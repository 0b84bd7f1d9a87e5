"""bitsandbytes layers built from the quantization kit's float layers, shared by the tests of every
method on these bases (the quantizers of ``QuantCase``)."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn

from peft_kernel.testing.quant import quantize_layers


@quantize_layers
def quantize_8bit(lin):
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(lin.state_dict())
    return q.to("cpu")


#: On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight for its bf16 CPU kernel
#: on the layer's first inference forward (eval mode, no grad); elsewhere it never does.
CPU_REPACKS = bnb.functional.has_avx512bf16()
HF_REPACKED_MERGE = (
    "HF PEFT 0.21.2 dequantizes a Linear4bit that bitsandbytes repacked for its AVX512-BF16 CPU kernel "
    "as if it held the standard layout, so it merges into a scrambled weight"
)
HF_REPACKED_FORWARD = (
    "HF PEFT 0.21.2 dequantizes a Linear4bit that bitsandbytes repacked for its AVX512-BF16 CPU kernel "
    "as if it held the standard layout, so a method whose forward reads W0 (HiRA) computes with a scrambled weight"
)


def quantize_4bit(quant_type, compress=True, repack=True):
    def make(lin):
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, compute_dtype=torch.float32,
            compress_statistics=compress, quant_type=quant_type,
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
            compress_statistics=compress, module=q,
        )
        q.bias = nn.Parameter(lin.bias.detach().clone())
        if not repack:  # what every CPU without AVX512-BF16 does
            q.support_avx512bf16_for_cpu = False
        return q.to("cpu")

    return quantize_layers(make)


def flag(name):
    """HF PEFT picks its bnb wrappers only for models flagged as loaded in 8/4 bit."""
    return lambda model: setattr(model, name, True)
