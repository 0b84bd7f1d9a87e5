"""LoRA (peft-kernel) on HQQLinear layers, and the same against HF PEFT: the kernel's
quantization-backend kit (:mod:`peft_kernel.testing.quant`) with hqq cases.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest
import torch

hqq_quantize = pytest.importorskip("hqq.core.quantize")
pytest.importorskip("peft_plugin_lora")

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


def quantizer(nbits, group_size=64):
    def make(lin):
        config = hqq_quantize.BaseQuantizeConfig(nbits=nbits, group_size=group_size)
        return hqq_quantize.HQQLinear(lin, config, compute_dtype=torch.float32, device="cpu")

    return quantize_layers(make)


def case(name, nbits, merged_tol, roundtrip_tol):
    # HF PEFT 0.21.2 builds a fresh HQQLinear when it merges and leaves the bias behind, so
    # its merged *outputs* are off by the bias; the merged weights are compared instead.
    return QuantCase(name, quantizer(nbits), "hqq", merged_tol=merged_tol, roundtrip_tol=roundtrip_tol,
                     reference_merge_tol=1e-5, reference_merged_compare="weight")


class TestLoraOnHqq(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoraConfig(target_modules=targets, r=8))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").LoraConfig(target_modules=targets, r=8)
    )
    cases = [case("8bit", 8, 0.01, 0.01), case("4bit", 4, 0.1, 0.12), case("2bit", 2, 0.6, 0.6)]
