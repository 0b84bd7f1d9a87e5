"""Invalid configurations and calls fail the same way (same exception type) as in HF PEFT."""

from __future__ import annotations

import pytest
import torch
from _models import HF, OURS, assert_same_exception, build_base, lora_kwargs, make_inputs


def _peft(lib, model, **overrides):
    cfg = lib.LoraConfig(**lora_kwargs(model, **overrides))
    return lib.get_peft_model(build_base(model), cfg)


def _two_adapters(lib, train=False):
    m = _peft(lib, "mlp")
    m.add_adapter("other", lib.LoraConfig(**lora_kwargs("mlp")))
    return m.train() if train else m.eval()


def _call(model, **kwargs):
    with torch.no_grad():
        return model(make_inputs("mlp")["x"], **kwargs)


CASES = {
    "target-not-found": lambda lib: _peft(lib, "mlp", target_modules=["does_not_exist"]),
    "r-zero": lambda lib: _peft(lib, "mlp", r=0),
    "mha-dora": lambda lib: _peft(lib, "mha", use_dora=True),
    "orthogonal-odd-rank": lambda lib: _peft(lib, "mlp", r=3, init_lora_weights="orthogonal"),
    "layers_pattern-without-layers_to_transform": lambda lib: lib.LoraConfig(
        target_modules=["q_proj"], layers_pattern="layers"
    ),
    "conv-groups-rank-not-divisible": lambda lib: _peft(lib, "conv2d_groups", r=3),
    "set-unknown-adapter": lambda lib: _peft(lib, "mlp").set_adapter("nope"),
    "mixed-batch-in-training-mode": lambda lib: _call(_two_adapters(lib, train=True), adapter_names=["default"] * 4),
    "mixed-batch-wrong-length": lambda lib: _call(_two_adapters(lib), adapter_names=["default", "other"]),
    "mixed-batch-unknown-adapter": lambda lib: _call(_two_adapters(lib), adapter_names=["default", "nope"] * 2),
    "mixed-batch-while-merged": lambda lib: (
        lambda m: (m.merge_adapter(), _call(m, adapter_names=["default"] * 4))
    )(_two_adapters(lib)),
    "add-adapter-existing-name": lambda lib: _peft(lib, "mlp").add_adapter(
        "default", lib.LoraConfig(**lora_kwargs("mlp"))
    ),
    "delete-unknown-adapter": lambda lib: _peft(lib, "mlp").delete_adapter("nope"),
    "exclude-everything": lambda lib: _peft(lib, "mlp", target_modules=["lin0"], exclude_modules=["lin0"]),
}


def _outcome(fn, lib):
    try:
        fn(lib)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_same_exception(name):
    hf_exc = _outcome(CASES[name], HF)
    ours_exc = _outcome(CASES[name], OURS)
    assert_same_exception(ours_exc, hf_exc, name)
