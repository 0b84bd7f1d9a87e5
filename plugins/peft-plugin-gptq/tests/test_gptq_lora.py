"""LoRA (peft-kernel) on GPTQ TorchLinear layers, and the same against HF PEFT.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gptqmodel.nn_modules.qlinear.torch")
pytest.importorskip("peft_plugin_lora")

import lora_checks_gptq as checks  # noqa: E402
from gptq_layers import rtn_gptq_linear  # noqa: E402


def quantize(model):
    for name in checks.TARGETS:
        setattr(model, name, rtn_gptq_linear(getattr(model, name), bits=4, group_size=32))
    return model


def test_lora_wraps_gptq_layers():
    checks.check_wraps(quantize, "gptq")


def test_lora_training_lowers_loss():
    first, last = checks.check_training(quantize)
    print(f"\n[gptq-4bit] loss {first:.4f} -> {last:.4f}")


def test_merge_is_refused_before_anything_changes():
    message = checks.check_merge_blocked(quantize, "forward only")
    print(f"\n[gptq-4bit] merge refused: {message}")


def test_lora_matches_hf_peft():
    errors = checks.check_against_hf(quantize, merge=False)
    print("\n[gptq-4bit] vs HF PEFT: " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))
