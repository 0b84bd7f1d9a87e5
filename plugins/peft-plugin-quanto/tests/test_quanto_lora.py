"""LoRA (peft-kernel) on optimum-quanto QLinear layers, and the same against HF PEFT.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

quanto = pytest.importorskip("optimum.quanto")
pytest.importorskip("peft_plugin_lora")

import lora_checks_quanto as checks  # noqa: E402


def quantizer(weights, frozen=True, activations=None):
    def quantize(model):
        quanto.quantize(model, weights=getattr(quanto, weights), activations=activations, include=checks.TARGETS)
        if frozen:
            quanto.freeze(model)
        return model

    return quantize


# (id, quantize, merged_tol, roundtrip_tol)
MERGEABLE = [
    ("qint8", quantizer("qint8"), 0.01, 0.01),
    ("qint8-dynamic", quantizer("qint8", frozen=False), 0.01, 1e-5),
    ("qfloat8", quantizer("qfloat8"), 0.05, 0.05),
    ("qint4", quantizer("qint4"), 0.12, 0.15),
]
ACT_QUANTIZED = ("qint8-act-qint8", quantizer("qint8", activations=quanto.qint8))
ALL = [(c[0], c[1]) for c in MERGEABLE] + [ACT_QUANTIZED]


@pytest.mark.parametrize("name,quantize", ALL, ids=[c[0] for c in ALL])
def test_lora_wraps_quanto_layers(name, quantize):
    checks.check_wraps(quantize, "quanto")


@pytest.mark.parametrize("name,quantize", ALL, ids=[c[0] for c in ALL])
def test_lora_training_lowers_loss(name, quantize):
    first, last = checks.check_training(quantize)
    print(f"\n[{name}] loss {first:.4f} -> {last:.4f}")


@pytest.mark.parametrize("name,quantize,merged_tol,roundtrip_tol", MERGEABLE, ids=[c[0] for c in MERGEABLE])
def test_lora_merge_against_fp32_merge(name, quantize, merged_tol, roundtrip_tol):
    errors = checks.check_merge(quantize, merged_tol, roundtrip_tol)
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))


def test_activation_quantized_merge_is_refused():
    message = checks.check_merge_blocked(ACT_QUANTIZED[1], "forward only")
    print(f"\n[{ACT_QUANTIZED[0]}] merge refused: {message}")


@pytest.mark.parametrize("name,quantize", ALL, ids=[c[0] for c in ALL])
def test_lora_matches_hf_peft(name, quantize):
    # HF PEFT has no quanto integration: it treats QLinear as the nn.Linear it subclasses.
    # The forward is comparable; its merge is only meaningful while the layer is not frozen
    # (the weight is still a float tensor), which is compared below.
    errors = checks.check_against_hf(quantize, merge=False)
    print(f"\n[{name}] vs HF PEFT: " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))


def test_lora_merge_matches_hf_peft_on_unfrozen_layers():
    errors = checks.check_against_hf(quantizer("qint8", frozen=False), merge=True, merged_tol=1e-6)
    print("\n[qint8-dynamic] merged vs HF PEFT: " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))
