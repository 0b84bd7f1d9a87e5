"""LoRA (peft-kernel) on torchao-quantized layers, and the same against HF PEFT: the
kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`) with torchao cases.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import warnings

import pytest

tq = pytest.importorskip("torchao.quantization")
pytest.importorskip("peft_plugin_lora")

from _torchao_quantizers import hf_quantizer, int8_wo_config, intx4_wo_config, quantizer  # noqa: E402

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402

warnings.filterwarnings("ignore", module="torchao")


def mergeable(name, make_config, merged_tol, roundtrip_tol):
    return QuantCase(name, quantizer(make_config), "torchao", merged_tol=merged_tol, roundtrip_tol=roundtrip_tol,
                     reference_merge_tol=1e-5, reference_prepare=hf_quantizer(make_config))


class TestLoraOnTorchao(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoraConfig(target_modules=targets, r=8))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").LoraConfig(target_modules=targets, r=8)
    )
    cases = [
        mergeable("int8-weight-only", int8_wo_config, 0.01, 0.01),
        mergeable("intx4-weight-only", intx4_wo_config, 0.12, 0.15),
        QuantCase("int8-dynamic-activation",
                  quantizer(lambda: tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)),
                  "torchao", merge_refusal="Int8DynamicActivationInt8WeightConfig"),
        QuantCase("float8-weight-only", quantizer(lambda: tq.Float8WeightOnlyConfig()), "torchao",
                  merge_refusal="Float8Tensor"),
    ]
