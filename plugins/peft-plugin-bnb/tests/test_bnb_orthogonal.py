"""OFT, BOFT and HRA on bitsandbytes layers: the kernel's quantized-base kit. These methods run
on the activations of a linear layer (they rotate or reflect its input), so the quantized layer's
own forward runs and nothing is dequantized; merging dequantizes, transforms and requantizes.
OFT also against HF PEFT, which runs OFT on quantized bases the same way.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest
from test_bnb_lora import (  # (skips this module without the backend library)
    CPU_REPACKS,
    HF_REPACKED_MERGE,
    flag,
    quantize_4bit,
    quantize_8bit,
)

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase

OFTConfig = pytest.importorskip("peft_plugin_oft").OFTConfig
BOFTConfig = pytest.importorskip("peft_plugin_boft").BOFTConfig
HRAConfig = pytest.importorskip("peft_plugin_hra").HRAConfig

NF4 = dict(quantize=quantize_4bit("nf4", True), backend="bnb-4bit", merged_tol=0.15, roundtrip_tol=0.2)


class TestOFTOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: OFTConfig(target_modules=targets, oft_block_size=16))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").OFTConfig(target_modules=targets, oft_block_size=16)
    )
    cases = [
        QuantCase("nf4-dq", **NF4, reference_merge_tol=1e-5, reference_prepare=flag("is_loaded_in_4bit"),
                  reference_merge_bug=HF_REPACKED_MERGE if CPU_REPACKS else None),
        QuantCase("int8", quantize_8bit, "bnb-8bit", merged_tol=0.01, roundtrip_tol=0.01, reference_merge_tol=1e-5,
                  reference_prepare=flag("is_loaded_in_8bit")),
    ]


class TestBOFTOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: BOFTConfig(target_modules=targets, boft_block_size=8,
                                                        boft_n_butterfly_factor=2))
    cases = [QuantCase("nf4-dq", **NF4)]


class TestHRAOnBnb(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: HRAConfig(target_modules=targets, r=8))
    identity_atol = 1e-5  # pairs of equal reflections cancel within rounding
    cases = [QuantCase("nf4-dq", **NF4)]
