"""HiRA beyond the oracle: the update's math, registration, bad input and quantized bases."""

import pytest
import torch

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_kernel.testing.toy_quant import ToyBackendPlugin, ToyInt8Linear
from peft_plugin_hira import HiraConfig, HiraModel


def test_registered_through_the_entry_point():
    spec = manager().method("HIRA")
    assert spec.config_cls is HiraConfig and spec.model_cls is HiraModel and spec.prefix == "hira_"
    assert isinstance(peft_kernel.get_peft_config({"peft_type": "HIRA", "target_modules": ["x"]}), HiraConfig)


def test_the_update_is_the_frozen_weight_times_b_a():
    """Grouped Conv2d 8 → 8 (groups 2, 3×3): ΔW[o, i, h, w] = W₀[o, i, h, w] · Σ_r B[o, r] A[r, i, h, w]."""
    model = peft_kernel.get_peft_model(M.build("conv2d"), HiraConfig(target_modules=["conv1"], r=3,
                                                                      init_weights=False))
    layer = model.base_model.model.conv1
    a, b = layer.hira_A["default"].detach(), layer.hira_B["default"].detach()
    assert a.shape == (3, 4, 3, 3) and b.shape == (8, 3, 1, 1)
    weight = layer.get_base_layer().weight.detach()
    D.assert_close(layer.delta_weight("default"), weight * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a), "ΔW")


def test_a_quantized_base_gives_its_dequantized_weight():
    manager().register(ToyBackendPlugin(), name="hira-behaviour-toy")
    try:
        model = M.build("mlp")
        model.lin0 = ToyInt8Linear(model.lin0)
        peft_model = peft_kernel.get_peft_model(model, HiraConfig(target_modules=["lin0"], r=2, init_weights=False))
        layer = peft_model.base_model.model.lin0
        low_rank = (layer.hira_B["default"] @ layer.hira_A["default"]).detach()
        D.assert_close(layer.delta_weight("default"), layer.get_base_layer().dequantize() * low_rank, "ΔW")
    finally:
        manager().unregister("hira-behaviour-toy")


def test_rank_must_be_positive_and_init_known():
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        peft_kernel.get_peft_model(M.build("mlp"), HiraConfig(target_modules=["lin0"], r=0))
    with pytest.raises(ValueError, match="Unknown HiRA init_weights='pissa'"):
        HiraConfig(init_weights="pissa")


def test_unmerging_several_adapters_restores_the_weight_exactly():
    """Merged adapters all multiply the weight from before the first merge; the last unmerge puts
    that weight back bit for bit (no accumulated rounding)."""
    model = peft_kernel.get_peft_model(M.build("mlp"), HiraConfig(target_modules=["lin0"], r=2, init_weights=False))
    model.add_adapter("b", HiraConfig(target_modules=["lin0"], r=2, init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    layer = model.base_model.model.lin0
    before = layer.get_base_layer().weight.detach().clone()
    low_rank = sum((layer.hira_B[n] @ layer.hira_A[n]).detach() for n in ("default", "b"))
    x = M.inputs("mlp")
    unmerged = D.run(model, x)
    model.merge_adapter()
    D.assert_close(layer.get_base_layer().weight, before * (1 + low_rank), "merged weight")
    D.assert_close(D.run(model, x), unmerged, "merged", atol=1e-4)
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before)
