"""LoRA (peft-kernel) on bitsandbytes-quantized layers, and the same against HF PEFT: the
kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`) with bnb cases.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft_plugin_lora")

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


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


class TestLoraOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoraConfig(target_modules=targets, r=8))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").LoraConfig(target_modules=targets, r=8)
    )
    cases = [
        QuantCase("int8", quantize_8bit, "bnb-8bit", merged_tol=0.01, roundtrip_tol=0.01,
                  reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_8bit")),
        # the layers as this CPU runs them (repacked after the first inference forward where it can)
        QuantCase("nf4-dq", quantize_4bit("nf4", True), "bnb-4bit", merged_tol=0.15, roundtrip_tol=0.2,
                  reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit"),
                  reference_merge_bug=HF_REPACKED_MERGE if CPU_REPACKS else None),
        QuantCase("fp4", quantize_4bit("fp4", False), "bnb-4bit", merged_tol=0.2, roundtrip_tol=0.3,
                  reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit"),
                  reference_merge_bug=HF_REPACKED_MERGE if CPU_REPACKS else None),
    ] + ([
        # and, on a CPU that repacks, the layers as every other CPU runs them
        QuantCase("nf4-dq-no-repack", quantize_4bit("nf4", True, repack=False), "bnb-4bit", merged_tol=0.15,
                  roundtrip_tol=0.2, reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit")),
        QuantCase("fp4-no-repack", quantize_4bit("fp4", False, repack=False), "bnb-4bit", merged_tol=0.2,
                  roundtrip_tol=0.3, reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit")),
    ] if CPU_REPACKS else [])
