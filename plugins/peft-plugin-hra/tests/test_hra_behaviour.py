"""HRA beyond the oracle: registration, bad input, and layers HF PEFT's HRA does not adapt. (Its
``peft-kernel finetune`` run is in tests/cli/test_cli_finetune.py.)"""

import pytest
import torch

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_hra import HRAConfig, HRAModel


def test_registered_through_the_entry_point():
    spec = manager().method("HRA")
    assert spec.config_cls is HRAConfig and spec.model_cls is HRAModel and spec.prefix == "hra_"
    assert not spec.is_mixed_compatible and spec.source == "hra"  # as in HF PEFT


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        peft_kernel.get_peft_model(M.build("mlp8"), HRAConfig(target_modules=["lin0"], r=0))


def test_an_odd_rank_starts_random_with_a_warning():
    with pytest.warns(peft_kernel.PeftWarning, match=r"odd r \(3\) cannot start as the identity"):
        model = peft_kernel.get_peft_model(M.build("mlp8"), HRAConfig(target_modules=["lin0"], r=3))
    x = M.inputs("mlp8")
    D.assert_differs(D.run(model, x), D.run(M.build("mlp8"), x), "odd-rank adapter")


def test_transformers_conv1d_layers():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = peft_kernel.get_peft_model(M.gpt2(), HRAConfig(target_modules=["c_attn", "c_fc"], r=4))
    assert model.base_model.model.transformer.h[0].attn.c_attn.hra_u["default"].shape == (32, 4)
    D.perturb(model, scale=0.3)
    D.assert_merge_keeps_outputs(model, M.inputs("gpt2"))
