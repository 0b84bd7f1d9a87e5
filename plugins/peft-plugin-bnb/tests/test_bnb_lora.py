"""LoRA (peft-kernel) on bitsandbytes-quantized layers, and the same against HF PEFT.

Run with ``-s`` to see the measured errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft_plugin_lora")

import lora_checks_bnb as checks  # noqa: E402


def _swap(model, make):
    for name in checks.TARGETS:
        lin = getattr(model, name)
        setattr(model, name, make(lin))
    return model


def quantize_8bit(model):
    def make(lin):
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False, threshold=0.0)
        q.load_state_dict(lin.state_dict())
        return q.to("cpu")

    return _swap(model, make)


def quantize_4bit(quant_type, compress=True):
    def quantize(model):
        def make(lin):
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, compute_dtype=torch.float32,
                compress_statistics=compress, quant_type=quant_type,
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                compress_statistics=compress, module=q,
            )
            q.bias = nn.Parameter(lin.bias.detach().clone())
            return q.to("cpu")

        return _swap(model, make)

    return quantize


# (id, quantize, backend name, merged_tol, roundtrip_tol, hf merged tol)
CASES = [
    ("int8", quantize_8bit, "bnb-8bit", 0.01, 0.01, 1e-5),
    ("nf4-dq", quantize_4bit("nf4", True), "bnb-4bit", 0.15, 0.2, 1e-5),
    ("fp4", quantize_4bit("fp4", False), "bnb-4bit", 0.2, 0.3, 1e-5),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_wraps_quantized_layers(case):
    _, quantize, backend, *_ = case
    checks.check_wraps(quantize, backend)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_training_lowers_loss(case):
    first, last = checks.check_training(case[1])
    print(f"\n[{case[0]}] loss {first:.4f} -> {last:.4f}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_merge_against_fp32_merge(case):
    name, quantize, _, merged_tol, roundtrip_tol, _ = case
    errors = checks.check_merge(quantize, merged_tol, roundtrip_tol)
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_lora_matches_hf_peft(case):
    name, quantize, *_, hf_tol = case
    flag = "is_loaded_in_8bit" if name == "int8" else "is_loaded_in_4bit"
    # HF PEFT picks its bnb wrappers only for models flagged as loaded in 8/4 bit
    errors = checks.check_against_hf(quantize, merge=True, merged_tol=hf_tol, hf_prepare=lambda m: setattr(m, flag, True))
    print(f"\n[{name}] vs HF PEFT: " + ", ".join(f"{k}={v:.3g}" for k, v in errors.items()))
