"""LoRA (peft-kernel) on GPTQ TorchLinear layers, and the same against HF PEFT: the
kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`) with a GPTQ case.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
pytest.importorskip("peft_plugin_lora")

from gptq_layers import rtn_gptq_linear  # noqa: E402

from peft_kernel.testing.quant import QuantBackendConformance, QuantCase, quantize_layers  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


class TestLoraOnGptq(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoraConfig(target_modules=targets, r=8))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").LoraConfig(target_modules=targets, r=8)
    )
    cases = [
        QuantCase("gptq-4bit", quantize_layers(lambda lin: rtn_gptq_linear(lin, bits=4, group_size=32)), "gptq",
                  merge_refusal="forward only"),
    ]
