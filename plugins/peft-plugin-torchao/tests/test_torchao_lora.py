"""LoRA (peft-kernel) on torchao-quantized layers, and the same against HF PEFT: the
kernel's quantization-backend kit (:mod:`peft_kernel.testing.quant`) with torchao cases.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

tq = pytest.importorskip("torchao.quantization")
pytest.importorskip("peft_plugin_lora")

from peft_kernel.testing.quant import TARGETS, QuantBackendConformance, QuantCase  # noqa: E402
from peft_plugin_lora import LoraConfig  # noqa: E402

warnings.filterwarnings("ignore", module="torchao")


def quantizer(make_config):
    def quantize(model):
        tq.quantize_(model, make_config(), filter_fn=lambda m, fqn: fqn in TARGETS)
        return model

    return quantize


def _hf_quantizer(make_config):
    """HF PEFT requantizes torchao weights with the config transformers keeps on the model
    (``model.hf_quantizer.quantization_config.get_apply_tensor_subclass``); stand in for it."""

    def prepare(model):
        model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(get_apply_tensor_subclass=make_config))

    return prepare


def int8_wo_config():
    return tq.Int8WeightOnlyConfig(set_inductor_config=False)


def intx4_wo_config():
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32))


def mergeable(name, make_config, merged_tol, roundtrip_tol):
    return QuantCase(name, quantizer(make_config), "torchao", merged_tol=merged_tol, roundtrip_tol=roundtrip_tol,
                     reference_merge_tol=1e-5, reference_prepare=_hf_quantizer(make_config))


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
