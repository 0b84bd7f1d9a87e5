"""LoRA (peft-kernel) on torchao-quantized layers, and the same against HF PEFT.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

tq = pytest.importorskip("torchao.quantization")
pytest.importorskip("peft_plugin_lora")

import lora_checks_torchao as checks  # noqa: E402

warnings.filterwarnings("ignore", module="torchao")


def quantizer(make_config):
    def quantize(model):
        tq.quantize_(model, make_config(), filter_fn=lambda m, fqn: fqn in checks.TARGETS)
        return model

    return quantize


int8_wo = quantizer(lambda: tq.Int8WeightOnlyConfig(set_inductor_config=False))
intx4_wo = quantizer(lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32)))
int8_dyn = quantizer(lambda: tq.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
float8_wo = quantizer(lambda: tq.Float8WeightOnlyConfig())

# (id, quantize, merged_tol, roundtrip_tol) for mergeable weights
MERGEABLE = [("int8-weight-only", int8_wo, 0.01, 0.01), ("intx4-weight-only", intx4_wo, 0.12, 0.15)]
# (id, quantize, expected fragment of the refusal)
FORWARD_ONLY = [
    ("int8-dynamic-activation", int8_dyn, "Int8DynamicActivationInt8WeightConfig"),
    ("float8-weight-only", float8_wo, "Float8Tensor"),
]
ALL = [(c[0], c[1]) for c in MERGEABLE + FORWARD_ONLY]


@pytest.mark.parametrize("name,quantize", ALL, ids=[c[0] for c in ALL])
def test_lora_wraps_torchao_layers(name, quantize):
    checks.check_wraps(quantize, "torchao")


@pytest.mark.parametrize("name,quantize", ALL, ids=[c[0] for c in ALL])
def test_lora_training_lowers_loss(name, quantize):
    first, last = checks.check_training(quantize)
    print(f"\n[{name}] loss {first:.4f} -> {last:.4f}")


@pytest.mark.parametrize("name,quantize,merged_tol,roundtrip_tol", MERGEABLE, ids=[c[0] for c in MERGEABLE])
def test_lora_merge_against_fp32_merge(name, quantize, merged_tol, roundtrip_tol):
    errors = checks.check_merge(quantize, merged_tol, roundtrip_tol)
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))


@pytest.mark.parametrize("name,quantize,fragment", FORWARD_ONLY, ids=[c[0] for c in FORWARD_ONLY])
def test_merge_is_refused(name, quantize, fragment):
    message = checks.check_merge_blocked(quantize, fragment)
    print(f"\n[{name}] merge refused: {message}")


@pytest.mark.parametrize("name,quantize", ALL, ids=[c[0] for c in ALL])
def test_lora_matches_hf_peft(name, quantize):
    errors = checks.check_against_hf(quantize, merge=False)
    print(f"\n[{name}] vs HF PEFT: " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))


def _hf_quantizer(make_config):
    """HF PEFT requantizes torchao weights with the config transformers keeps on the model
    (``model.hf_quantizer.quantization_config.get_apply_tensor_subclass``); stand in for it."""

    def prepare(model):
        model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(get_apply_tensor_subclass=make_config))

    return prepare


@pytest.mark.parametrize(
    "name,quantize,make_config",
    [
        ("int8-weight-only", int8_wo, lambda: tq.Int8WeightOnlyConfig(set_inductor_config=False)),
        ("intx4-weight-only", intx4_wo, lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(32))),
    ],
    ids=["int8-weight-only", "intx4-weight-only"],
)
def test_lora_merge_matches_hf_peft(name, quantize, make_config):
    errors = checks.check_against_hf(quantize, merge=True, merged_tol=1e-5, hf_prepare=_hf_quantizer(make_config))
    print(f"\n[{name}] merged vs HF PEFT: " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))
