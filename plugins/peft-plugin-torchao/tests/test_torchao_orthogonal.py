"""OFT, BOFT and HRA on torchao int8 weight-only layers: the kernel's quantized-base kit. These
methods rotate or reflect the input of a linear layer, so the quantized layer's own forward runs;
merging dequantizes, transforms and requantizes. OFT also against HF PEFT.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest
from test_torchao_lora import int8_wo_config, mergeable, quantizer  # (skips this module without the backend library)

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase

OFTConfig = pytest.importorskip("peft_plugin_oft").OFTConfig
BOFTConfig = pytest.importorskip("peft_plugin_boft").BOFTConfig
HRAConfig = pytest.importorskip("peft_plugin_hra").HRAConfig

INT8 = dict(quantize=quantizer(int8_wo_config), backend="torchao", merged_tol=0.01, roundtrip_tol=0.01)


class TestOFTOnTorchao(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: OFTConfig(target_modules=targets, oft_block_size=16))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").OFTConfig(target_modules=targets, oft_block_size=16)
    )
    cases = [mergeable("int8-weight-only", int8_wo_config, 0.01, 0.01)]


class TestBOFTOnTorchao(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: BOFTConfig(target_modules=targets, boft_block_size=8,
                                                        boft_n_butterfly_factor=2))
    cases = [QuantCase("int8-weight-only", **INT8)]


class TestHRAOnTorchao(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: HRAConfig(target_modules=targets, r=8))
    identity_atol = 1e-5  # pairs of equal reflections cancel within rounding
    cases = [QuantCase("int8-weight-only", **INT8)]
