"""LoRA (peft-kernel) on optimum-quanto QLinear layers, and the same against HF PEFT: the
kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`) with quanto cases.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

quanto = pytest.importorskip("optimum.quanto")
pytest.importorskip("peft_plugin_lora")

from peft_kernel.testing.quant import TARGETS, QuantBackendConformance, QuantCase  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402


def quantizer(weights, frozen=True, activations=None):
    def quantize(model):
        quanto.quantize(model, weights=getattr(quanto, weights), activations=activations, include=list(TARGETS))
        if frozen:
            quanto.freeze(model)
        return model

    return quantize


class TestLoraOnQuanto(QuantBackendConformance):
    config_fn = staticmethod(lambda targets: LoraConfig(target_modules=targets, r=8))
    reference_config_fn = staticmethod(
        lambda targets: pytest.importorskip("peft").LoraConfig(target_modules=targets, r=8)
    )
    # HF PEFT has no quanto integration: it treats QLinear as the nn.Linear it subclasses.
    # The forward is comparable; its merge is only meaningful while the layer is not frozen
    # (the weight is still a float tensor), so only qint8-dynamic compares merged models.
    cases = [
        QuantCase("qint8", quantizer("qint8"), "quanto", merged_tol=0.01, roundtrip_tol=0.01),
        QuantCase("qint8-dynamic", quantizer("qint8", frozen=False), "quanto", merged_tol=0.01, roundtrip_tol=1e-5,
                  reference_merge_tol=1e-6),
        QuantCase("qfloat8", quantizer("qfloat8"), "quanto", merged_tol=0.05, roundtrip_tol=0.05),
        QuantCase("qint4", quantizer("qint4"), "quanto", merged_tol=0.12, roundtrip_tol=0.15),
        QuantCase("qint8-act-qint8", quantizer("qint8", activations=quanto.qint8), "quanto",
                  merge_refusal="forward only"),
    ]
