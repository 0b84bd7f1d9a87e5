"""MiSS beyond the oracle: the shard's math, registration and bad input."""

import pytest
import torch

import peft_kernel
from peft_kernel.plugins import manager
from peft_kernel.testing import differential as D
from peft_kernel.testing import tiny_models as M
from peft_plugin_miss import MissBatLayer, MissConfig, MissLayer, MissModel


def test_registered_through_the_entry_point():
    spec = manager().method("MISS")
    assert spec.config_cls is MissConfig and spec.model_cls is MissModel and spec.prefix == "miss_"
    assert isinstance(peft_kernel.get_peft_config({"peft_type": "MISS", "target_modules": ["x"]}), MissConfig)


def _layer(**kwargs):
    model = peft_kernel.get_peft_model(M.build("mlp"), MissConfig(target_modules=["lin0"], **kwargs))
    layer = model.base_model.model.lin0
    block = layer.miss_block["default"]
    with torch.no_grad():  # seeded: the test must not depend on what ran before it
        block.copy_(torch.randn(block.shape, generator=torch.Generator().manual_seed(0)))
    return layer


def test_the_shard_repeats_across_the_weight():
    """lin0 is 10 → 16; with r = 3 the input features are the groups 0-2, 3-5, 6-8 and 9."""
    layer = _layer(r=3)
    block = layer.miss_block["default"].detach()  # (3, 16)
    delta = layer.delta_weight("default")
    for i in range(10):
        torch.testing.assert_close(delta[:, i], block[i % 3])
    mini = _layer(r=2, mini_r=4, init_weights="mini")
    block, delta = mini.miss_block["default"].detach(), mini.delta_weight("default")  # block (2, 4)
    for o in range(16):
        for i in range(10):
            assert delta[o, i] == block[i % 2, o % 4]


def test_bat_transforms_each_block_and_unmerges_exactly():
    layer = _layer(r=2, init_weights="bat")
    assert isinstance(layer, MissBatLayer)
    weight = layer.get_base_layer().weight.detach().clone()
    block = layer.miss_block["default"].detach()  # (8, 2, 2): one per 2 output rows
    expected = weight.clone()
    for o in range(8):
        for i in range(5):
            tile = weight[2 * o:2 * o + 2, 2 * i:2 * i + 2]
            expected[2 * o:2 * o + 2, 2 * i:2 * i + 2] = tile @ (torch.eye(2) + block[o]) + block[o]
    layer.merge()
    torch.testing.assert_close(layer.get_base_layer().weight, expected)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer().weight, weight, atol=1e-6, rtol=1e-6)


def test_bat_and_other_variants_cannot_share_a_layer():
    """HF PEFT silently reads a second adapter with the first one's variant; here it is refused and
    the model stays as it was."""
    model = peft_kernel.get_peft_model(M.build("mlp"), MissConfig(target_modules=["lin0"], r=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'bat' variant transforms the weight and cannot share a layer"):
        model.add_adapter("b", MissConfig(target_modules=["lin0"], r=2, init_weights="bat"))
    assert list(model.peft_config) == ["default"] and set(model.state_dict()) == set(state)
    assert isinstance(model.base_model.model.lin0, MissLayer)


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, "`r` should be a positive integer"),
    ({"r": 11}, r"`r` \(11\) must be less than or equal to in_features \(10\)"),
    ({"r": 3, "init_weights": "bat"}, r"into \[r, r\] blocks"),
    ({"r": 2, "mini_r": 3, "init_weights": "mini"}, "divisible by mini_r"),
])
def test_bad_sizes_are_clear_errors(kwargs, message):
    model = M.build("mlp")
    with pytest.raises(ValueError, match=message):
        peft_kernel.get_peft_model(model, MissConfig(target_modules=["lin0"], **kwargs))
    assert type(model.lin0) is torch.nn.Linear


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="'batt' is not a MiSS variant"):
        MissConfig(init_weights="batt")


def test_transformers_conv1d_layers_keep_the_linear_layout():
    torch.manual_seed(0)
    for variant in (True, "bat"):
        model = peft_kernel.get_peft_model(M.build("gpt2"), MissConfig(target_modules=["c_attn"], r=4,
                                                                       init_weights=variant))
        D.perturb(model)
        x = M.inputs("gpt2")
        unmerged = D.run(model, x)
        model.merge_adapter()
        D.assert_close(D.run(model, x), unmerged, f"merged Conv1D ({variant})", atol=1e-4)
